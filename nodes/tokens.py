"""Which token positions of a prompt hold the edited words, as the CLIP tokenizes them."""

from __future__ import annotations

import re

from .host import fail


def words_of(text: str):
    return [w for w in re.split(r"[\s,.;:!?()\[\]]+", text.lower()) if w]


def edited(node, clip, source_text, target_text, words, key=None):
    """{"source": positions, "target": positions} of the edited words in each prompt.

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
    return {"source": positions(clip, source_text, wanted_src, node, key),
            "target": positions(clip, target_text, wanted_tgt, node, key)}


def positions(clip, text, words, node, key=None):
    """Token positions of ``words`` in ``text`` as the CLIP tokenizes it.

    ``key`` names the tokenizer whose tokens form the model's context: CLIP-L ("l") for
    UNets and SD3 (whose context starts with the CLIP tokens); T5 ("t5xxl") where T5 alone
    is the context (Flux, Wan). A missing key falls back to "l", then to the first one.
    """
    if not words:
        return []
    prompt = ids(clip, text, key)
    tokens = [t for _, t in prompt]
    found = []
    for w in words:
        sub = [t for _, t in ids(clip, w, key)]
        hits = [i for i in range(len(tokens) - len(sub) + 1) if sub and tokens[i:i + len(sub)] == sub]
        if not hits:
            fail(node, "words", f"'{w}' is not among the tokens of the prompt text")
        for i in hits:
            found.extend(p for p, _ in prompt[i:i + len(sub)])
    return sorted(set(found))


def ids(clip, text, key=None):
    """(position, token) for the word tokens of ``text`` (start, end and padding left out)."""
    tokens = clip.tokenize(text, return_word_ids=True)
    if key not in tokens or (key == "t5xxl" and "g" in tokens):
        key = "l" if "l" in tokens else next(iter(tokens))
    flat = [t for chunk in tokens[key] for t in chunk]
    return [(i, int(t[0])) for i, t in enumerate(flat) if len(t) > 2 and t[2] > 0]
