"""Attention capture: the edited words' attention on the image, read while the model runs.

UNets (SD1.5, SDXL): an attn2 replace patch on every cross-attention layer; it computes
the layer's attention with the host's ``optimized_attention`` and passes the transformer
options on, so an attention backend the user chose (``optimized_attention_override``)
still runs there. DiTs (SD3, Flux: joint [context, image] attention; Wan: cross attention
of the image tokens on the context over a T x H x W token grid): the host's attention
override, chained to an override already set (the core ModelAttentionBackend node,
``ModelPatcher.set_model_optimized_attention``) rather than replacing it. Maps are read
from the cond chunks of the call being evaluated: the edit guider hands each call a fresh
``Capture.call(branch)`` in the transformer options (``KEY``), the hooks add that call's
maps to it, and the guider returns them with the call's prediction; the editor keeps and
combines them (``solvers.editing.attention.Maps``).
"""

from __future__ import annotations

import comfy.ldm.modules.attention

from ...solvers.editing import attention

OVERRIDE = "optimized_attention_override"
KEY = "inversion_suite_capture"  # transformer option: the capture of the call being evaluated


class Capture:
    """The edited words of a run (tokens per branch, fitted to each context) and its hooks; or,
    made by ``call``, one call's capture: its branch and the maps its layers gave, in order."""

    def __init__(self, tokens: dict, counts: dict, size: tuple):
        self.tokens, self.counts, self.size = tokens, counts, tuple(size)  # counts: branch -> (count, head)
        self.branch = None  # a call's capture: the branch evaluated
        self.maps = []  # a call's capture: (downsampling factor, map) per layer
        self.text_len = {}  # branch -> context tokens
        self.previous = None  # the attention override that was set before ours

    def context(self, lengths: dict):
        """Fit the token positions to each branch's conditioning of ``lengths`` tokens.

        A text encoder may drop the tokens before the text (Qwen-Image's drops its chat
        template's head, 34 tokens), leaving a context that many tokens shorter than the
        tokenizer's list; a context as long or longer (SD3: CLIP tokens, then T5's) starts
        with the list.
        """
        self.text_len = dict(lengths)
        for b, n in lengths.items():
            count, head = self.counts.get(b, (0, 0))
            cut = min(head, max(0, count - n))
            self.tokens[b] = [p - cut for p in self.tokens.get(b, []) if p >= cut]

    def active(self):
        return any(self.tokens.values())

    def call(self, branch: str) -> "Capture":
        """A fresh capture for one evaluation of ``branch``."""
        c = Capture({branch: list(self.tokens.get(branch, []))}, {}, self.size)
        c.branch, c.text_len = branch, dict(self.text_len)
        return c

    def attach(self, model, unet_layers):
        """A clone of ``model`` with the capture attached (``model`` itself when no word is edited)."""
        if not self.active():
            return model
        m = model.clone()
        if unet_layers:
            for key in unet_layers:
                m.set_model_attn2_replace(self.hook, *key)
        else:
            options = m.model_options.setdefault("transformer_options", {})
            self.previous = options.get(OVERRIDE)
            options[OVERRIDE] = self.override
        return m

    def override(self, func, *args, **kwargs):
        out = self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        rec = options.get(KEY)
        tokens = rec.tokens.get(rec.branch) if rec is not None else None
        if not tokens or rec.branch not in rec.text_len:
            return out
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        if not kwargs.get("skip_reshape"):
            q, k = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
        text = rec.text_len[rec.branch]
        rows = cond_rows(q.shape[0], options)
        if not rows:
            return out
        if k.shape[2] == q.shape[2]:
            # Joint attention over [context, image]; image-only self-attention leaves no grid
            # after the context's length.
            grid = attention.layer_grid(q.shape[2] - text, self.size)
            if grid is not None:
                att = attention.joint_token_attention(q[rows], k[rows], text, tokens)
                rec.add(grid[0], attention.layer_map(att, grid[1], self.size))
        elif k.shape[2] == text:
            # Cross attention of image tokens on the context (Wan).
            grid = attention.layer_grid(q.shape[2], self.size)
            if grid is not None:
                att = attention.joint_token_attention(q[rows], k[rows], 0, tokens)
                rec.add(grid[0], attention.layer_map(att, grid[1], self.size))
        return out

    def hook(self, q, k, v, extra):
        heads = extra["n_heads"]
        out = comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"),
                                                              transformer_options=extra)
        rec = extra.get(KEY)
        tokens = rec.tokens.get(rec.branch) if rec is not None else None
        grid = attention.layer_grid(q.shape[1], self.size)
        rows = cond_rows(q.shape[0], extra) if tokens and grid else None
        if rows:
            att = attention.token_attention(q[rows], k[rows], heads, tokens)
            rec.add(grid[0], attention.layer_map(att, grid[1], self.size))
        return out

    def add(self, factor, m):
        self.maps.append((factor, m))


def cond_rows(batch, options):
    """Batch rows of the cond chunks (the host runs cond and uncond as chunks of one batch)."""
    chunks = options.get("cond_or_uncond", [0])
    n = batch // len(chunks)
    return [r for j, c in enumerate(chunks) if c == 0 for r in range(j * n, (j + 1) * n)]


def unet_layers(model):
    """attn2 patch keys (block, index, transformer index) of a UNet, found from its module names."""
    keys = []
    for name, _ in model.model.diffusion_model.named_modules():
        parts = name.split(".")
        if parts[-1] != "attn2" or "transformer_blocks" not in parts:
            continue
        block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}.get(parts[0])
        if block is None:
            continue
        keys.append((block, 0 if block == "middle" else int(parts[1]), int(parts[parts.index("transformer_blocks") + 1])))
    return keys
