"""What the editing nodes share: the edit region's inputs, attention capture, and a two-prompt guider.

The edit region comes from cross-attention maps of the edited words (UNet models: attn2
patches on a cloned model; SD3 and Flux: the host's attention override), from a MASK
input, or from both combined. The maps are read
from the source prompt's branch for words of the source prompt and from the target
branch for words of the target prompt, cond chunks only.
"""

from __future__ import annotations

import re

import comfy.ldm.modules.attention
import comfy.samplers
import torch
from comfy_api.latest import io

from ..solvers import editing
from .host import check_conditioning, fail, negative_for

MODES = ["replace", "union", "intersect"]


def inputs():
    """The edit-region inputs every editing node takes."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="The CLIP that encoded the prompts: finds the edited words' tokens for the attention "
                              "mask. Leave unconnected to use only the MASK input."),
        io.String.Input("source_text", multiline=True, default="",
                        tooltip="The source prompt's text (as encoded into 'source'), to locate its words."),
        io.String.Input("target_text", multiline=True, default="",
                        tooltip="The target prompt's text (as encoded into 'target'), to locate its words."),
        io.String.Input("words", default="",
                        tooltip="Words whose attention marks the edit region, separated by commas or spaces. "
                                "Empty: the words of the target text missing from the source text, and the "
                                "words of the source text missing from the target text."),
        io.Mask.Input("mask", optional=True,
                      tooltip="A region to edit (white = edit). Combined with the attention mask by mask_mode."),
        io.Combo.Input("mask_mode", options=MODES, default="union",
                       tooltip="How a MASK input meets the attention mask: replace it, union or intersect."),
        io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                       tooltip="Attention (relative to its maximum) above which a pixel is edited. Lower grows the region."),
        io.Float.Input("softness", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Width of a linear ramp around the threshold; 0 gives a hard mask."),
        io.Int.Input("dilation", default=1, min=0, max=16,
                     tooltip="Grow the attention mask by this many latent pixels (8 image pixels each for SD)."),
    ]


def _words(text: str):
    return [w for w in re.split(r"[\s,.;:!?()\[\]]+", text.lower()) if w]


class Region:
    """The edit region of one node run: validated inputs, attention capture, the mask."""

    def __init__(self, node, model, latent, clip, source_text, target_text, words, mask, mask_mode, threshold,
                 softness, dilation):
        self.node, self.mode = node, mask_mode
        self.unet = bool(attention_layers(model))
        self.threshold, self.softness, self.dilation = threshold, softness, dilation
        if latent.ndim != 4:
            fail(node, "inverted", "editing needs an image latent (B, C, H, W)")
        b, _, h, w = latent.shape
        self.size, self.batch = (h, w), b
        if mask_mode not in MODES:
            fail(node, "mask_mode", f"expected one of {', '.join(MODES)}, got {mask_mode!r}")
        self.user = None if mask is None else self._user_mask(mask)
        self.tokens = {"source": [], "target": []}
        if clip is not None and not (mask is not None and mask_mode == "replace"):
            self._find_tokens(clip, source_text, target_text, words)
        if self.user is None and not any(self.tokens.values()):
            fail(node, "mask", "no edit region: connect a MASK, or a CLIP with the prompts' texts and the words to edit")
        self.maps = {}  # (branch, downsampling factor) -> (sum of maps, count)
        self.branch = None
        self.text_len = {}  # branch -> context tokens, for joint-attention models
        self.seen = False  # whether a prompt branch has been evaluated yet

    def _user_mask(self, mask):
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            fail(self.node, "mask", "expected a MASK (H, W) or (B, H, W)")
        mask = mask if mask.ndim == 3 else mask[None]
        h, w = self.size
        if mask.shape[0] not in (1, self.batch):
            fail(self.node, "mask", f"has a batch of {mask.shape[0]}, expected 1 or the latent's {self.batch}")
        if abs(mask.shape[-2] * w - mask.shape[-1] * h) > max(h, w) * 8:
            fail(self.node, "mask", f"is {mask.shape[-1]}x{mask.shape[-2]} but the image is {w * 8}x{h * 8} "
                                    f"(latent {w}x{h}): resize the mask to the image")
        return editing.resize_mask(mask, self.size, self.batch)

    def _find_tokens(self, clip, source_text, target_text, words):
        src, tgt = _words(source_text), _words(target_text)
        wanted = _words(words) if words.strip() else None
        if wanted is None:
            wanted_src = [w for w in src if w not in tgt]
            wanted_tgt = [w for w in tgt if w not in src]
            if not wanted_src and not wanted_tgt:
                fail(self.node, "words", "the source and target texts have the same words: name the words to edit")
        else:
            wanted_src = [w for w in wanted if w in src]
            wanted_tgt = [w for w in wanted if w in tgt]
            missing = [w for w in wanted if w not in src and w not in tgt]
            if missing:
                fail(self.node, "words", f"{', '.join(missing)} not found in source_text or target_text")
        key = None if self.unet else "t5xxl"
        self.tokens = {"source": positions(clip, source_text, wanted_src, self.node, key),
                       "target": positions(clip, target_text, wanted_tgt, self.node, key)}

    def attach(self, model):
        """A clone of ``model`` that records the edited tokens' attention maps.

        UNets (SD1.5, SDXL): an attn2 replace patch on every cross-attention layer. Joint
        attention DiTs (SD3, Flux: context tokens first, then image tokens): the host's
        attention override, reading the image queries' attention on the context tokens.
        """
        if not any(self.tokens.values()):
            return model
        m = model.clone()
        if self.unet:
            for key in attention_layers(model):
                m.set_model_attn2_replace(self._hook, *key)
        else:
            options = m.model_options.setdefault("transformer_options", {})
            options["optimized_attention_override"] = self._override
        return m

    def _override(self, func, *args, **kwargs):
        out = func(*args, **kwargs)
        tokens = self.tokens.get(self.branch) if self.branch else None
        if tokens and self.branch in self.text_len:
            q, k = args[0], args[1]
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            if not kwargs.get("skip_reshape"):
                q, k = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
            text = self.text_len[self.branch]
            grid = editing.layer_grid(q.shape[2] - text, self.size)
            # Joint attention over [context, image] only: image-only self-attention does not
            # leave a grid after the context's length.
            if grid is not None and k.shape[2] == q.shape[2]:
                rows = _cond_rows(q.shape[0], kwargs.get("transformer_options", {}))
                if rows:
                    att = editing.joint_token_attention(q[rows], k[rows], text, tokens)
                    self._add(grid[0], editing.layer_map(att, grid[1], self.size))
        return out

    def _hook(self, q, k, v, extra):
        heads = extra["n_heads"]
        out = comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"))
        tokens = self.tokens.get(self.branch) if self.branch else None
        grid = editing.layer_grid(q.shape[1], self.size)
        rows = _cond_rows(q.shape[0], extra) if tokens and grid else None
        if rows:
            att = editing.token_attention(q[rows], k[rows], heads, tokens)
            self._add(grid[0], editing.layer_map(att, grid[1], self.size))
        return out

    def _add(self, factor, m):
        key = (self.branch, factor)
        total, n = self.maps.get(key, (0, 0))
        self.maps[key] = (total + m, n + 1)

    def current(self):
        """The mask now: (B, 1, h, w), from the maps gathered so far and the MASK input.

        Layers at 1/4 of the latent's resolution (prompt-to-prompt's 16x16 maps on SD1.5)
        are used where the model has them, else the coarsest below that.
        """
        factors = {f for _, f in self.maps}
        if not factors and any(self.tokens.values()) and self.branch is None and self.seen:
            fail(self.node, "model", "no attention on the edited words could be read from this model (it has "
                                     "neither UNet cross-attention nor joint [text, image] attention): connect a "
                                     "MASK and set mask_mode to replace")
        raw = None
        if factors:
            pick = 4 if 4 in factors else max(f for f in factors if f <= 4) if min(factors) <= 4 else min(factors)
            for (branch, f), (total, n) in self.maps.items():
                if f == pick:
                    mean = total / n
                    mean = mean.repeat(self.batch // mean.shape[0], 1, 1, 1)
                    raw = mean if raw is None else raw + mean
        att = None if raw is None else editing.shape_mask(raw, self.threshold, self.softness, self.dilation)
        user = None if self.user is None else self.user.to(raw.device if raw is not None else self.user.device)
        m = editing.combine_masks(att, user, self.mode)
        return torch.zeros(self.batch, 1, *self.size) if m is None else m

    def uniform(self):
        """The mask's single value where it is known in advance and constant, else None."""
        if self.maps or any(self.tokens.values()) or self.user is None:
            return None
        lo, hi = float(self.user.min()), float(self.user.max())
        return lo if lo == hi else None


def _cond_rows(batch, options):
    """Batch rows of the cond chunks (the host runs cond and uncond as chunks of one batch)."""
    chunks = options.get("cond_or_uncond", [0])
    n = batch // len(chunks)
    return [r for j, c in enumerate(chunks) if c == 0 for r in range(j * n, (j + 1) * n)]


def positions(clip, text, words, node, key=None):
    """Token positions of ``words`` in ``text`` as the CLIP tokenizes it.

    ``key`` names the tokenizer whose tokens form the model's context: CLIP-L ("l") for
    UNets and SD3 (whose context starts with the CLIP tokens); T5 ("t5xxl") where T5 alone
    is the context (Flux). A missing key falls back to "l", then to the first one.
    """
    if not words:
        return []
    prompt = _ids(clip, text, key)
    tokens = [t for _, t in prompt]
    found = []
    for w in words:
        sub = [t for _, t in _ids(clip, w, key)]
        hits = [i for i in range(len(tokens) - len(sub) + 1) if sub and tokens[i:i + len(sub)] == sub]
        if not hits:
            fail(node, "words", f"'{w}' is not among the tokens of the prompt text")
        for i in hits:
            found.extend(p for p, _ in prompt[i:i + len(sub)])
    return sorted(set(found))


def _ids(clip, text, key=None):
    """(position, token) for the word tokens of ``text`` (start, end and padding left out)."""
    tokens = clip.tokenize(text, return_word_ids=True)
    if key not in tokens or (key == "t5xxl" and "g" in tokens):
        key = "l" if "l" in tokens else next(iter(tokens))
    flat = [t for chunk in tokens[key] for t in chunk]
    return [(i, int(t[0])) for i, t in enumerate(flat) if len(t) > 2 and t[2] > 0]


def attention_layers(model):
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


def guider(node, model, region, source, target, negative):
    """The checked prompts in an ``EditGuider`` over ``model`` with ``region``'s capture attached."""
    check_conditioning(node, target, "target")
    negative = negative_for(node, source, negative, "source")
    g = EditGuider(region.attach(model), region)
    g.set_prompts(source, target, negative)
    return g


class EditGuider(comfy.samplers.CFGGuider):
    """A guider holding the source and target prompts; ``run`` decides what each call returns.

    ``guided`` follows the host's own ``sampling_function`` for a scalar scale (hooks, cfg-1
    shortcut and all) and its ``cfg_function`` for a per-pixel scale, given as a callable.
    """

    def __init__(self, model, region=None):
        super().__init__(model)
        self.region = region
        self.run = None

    def set_prompts(self, source, target, negative):
        self.inner_set_conds({"positive": source, "target": target, "negative": negative})
        if self.region is not None:
            self.region.text_len = {"source": source[0][0].shape[1], "target": target[0][0].shape[1]}

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return self.run(self, x, timestep, model_options, seed)

    def guided(self, branch, x, timestep, scale, model_options, seed=None):
        cond = self.conds["positive" if branch == "source" else "target"]
        neg = self.conds.get("negative")
        if self.region is not None:
            self.region.branch = branch
        try:
            if not callable(scale):
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, neg, cond, scale,
                                                        model_options=model_options, seed=seed)
            c, u = comfy.samplers.calc_cond_batch(self.inner_model, [cond, neg], x, timestep, model_options)
            # The per-pixel scale may depend on attention recorded during this very call.
            return comfy.samplers.cfg_function(self.inner_model, c, u, scale().to(x), x, timestep,
                                               model_options=model_options, cond=cond, uncond=neg)
        finally:
            if self.region is not None:
                self.region.branch = None
                self.region.seen = True
