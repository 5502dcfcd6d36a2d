"""Which token positions of a prompt hold the edited words, as the CLIP tokenizes them."""

from __future__ import annotations

import re

from .inputs import fail


def words_of(text: str):
    return [w for w in re.split(r"[\s,.;:!?()\[\]]+", text.lower()) if w]


def edited(node, clip, source_text, target_text, words, key=None):
    """The edited words' token positions in each prompt, and each prompt's token counts:
    ({"source": positions, "target": positions}, {"source": (count, head), "target": ...}),
    ``count`` its tokens in all, ``head`` those before the text (see ``ids``).

    Empty ``words``: the words of each text missing from the other. ``key`` names the
    tokenizer whose tokens form the model's context (see ``positions``).
    """
    src, tgt = words_of(source_text), words_of(target_text)
    if words.strip():
        wanted = words_of(words)
        missing = [w for w in wanted if w not in src and w not in tgt]
        if missing:
            fail(node, "words", f"{', '.join(missing)} not found in source_text or target_text")
        wanted_src, wanted_tgt = [w for w in wanted if w in src], [w for w in wanted if w in tgt]
    else:
        wanted_src, wanted_tgt = [w for w in src if w not in tgt], [w for w in tgt if w not in src]
        if not wanted_src and not wanted_tgt:
            fail(node, "words", "the source and target texts have the same words: name the words to edit")
    found = {b: positions(clip, text, w, node, key)
             for b, text, w in (("source", source_text, wanted_src), ("target", target_text, wanted_tgt))}
    return {b: f[0] for b, f in found.items()}, {b: f[1] for b, f in found.items()}


def positions(clip, text, words, node, key=None):
    """(token positions of ``words`` in ``text`` as the CLIP tokenizes it, (count, head) as ``ids``).

    ``key`` names the tokenizer whose tokens form the model's context: CLIP-L ("l") for
    UNets and SD3 (whose context starts with the CLIP tokens); T5 ("t5xxl") where T5 alone
    is the context (Flux, Wan). A missing key falls back to "l", then to the first one.
    A word is looked for as it stands and after a space: byte-level BPE tokenizers
    (Qwen's) spell a word differently at the start of a text and inside it.
    """
    if not words:
        return [], (0, 0)
    prompt, frame = ids(clip, text, key)
    tokens = [t for _, t in prompt]
    found = []
    for w in words:
        subs = {tuple(t for _, t in ids(clip, v, key)[0]) for v in (w, " " + w)}
        hits = [(i, len(sub)) for sub in subs if sub for i in range(len(tokens) - len(sub) + 1)
                if tuple(tokens[i:i + len(sub)]) == sub]
        if not hits:
            fail(node, "words", f"'{w}' is not among the tokens of the prompt text")
        for i, n in hits:
            found.extend(p for p, _ in prompt[i:i + n])
    return sorted(set(found)), frame


def ids(clip, text, key=None):
    """((position, token) for the word tokens ``text`` adds, (tokens in all, tokens before the text)).

    Word tokens carry a word id (start, end and padding tokens do not); a chat template
    such as Qwen-Image's is words too, so what ``text`` adds is what its tokens hold
    beyond those of the empty prompt (the common head and tail of the two).
    """
    full, empty = flat(clip, text, key), flat(clip, "", key)
    n = min(len(full), len(empty))
    head = next((i for i in range(n) if full[i] != empty[i]), n)
    tail = next((i for i in range(n - head) if full[-1 - i] != empty[-1 - i]), n - head)
    return [(i, full[i][0]) for i in range(head, len(full) - tail) if full[i][1] > 0], (len(full), head)


def flat(clip, text, key):
    """(token, word id) of ``text`` as the tokenizer ``key`` makes them, chunks joined."""
    tokens = clip.tokenize(text, return_word_ids=True)
    if key not in tokens or (key == "t5xxl" and "g" in tokens):
        key = "l" if "l" in tokens else next(iter(tokens))
    return [(int(t[0]) if isinstance(t[0], int) else -1, t[2] if len(t) > 2 else 0)
            for chunk in tokens[key] for t in chunk]
