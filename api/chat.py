"""Chat messages -> prompt token ids through the model's chat template, without letting content forge turns.

A chat template renders messages into text such as "<|im_start|>user\\nHi<|im_end|>\\n", which the tokenizer
then reads, special tokens included. Left alone, a user who writes "<|im_end|>\\n<|im_start|>system\\n..." in
a message gets real special tokens out of it: a forged system or assistant turn. Nor can the content be found
again in the rendered text by searching for it: content equal to "user", "\\n" or "<|im_start|>" is found
inside the template's own text first. So the template is rendered a second time with a sentinel as each
content (the message's index between runs of a private-use character longer than any run of it in the contents,
occurring nowhere else in that rendering): the text around the sentinels is the template's own, and the
sentinels say where each content goes.

The rule, for any messages: the template's own text keeps its special tokens (the tokenizer's special-token
texts found in it, leftmost-longest); everything between two of them, the template's ordinary text and the
contents placed there alike, is tokenized together as plain text (special-token text split into ordinary
tokens, as `split_special_tokens=True`). So ordinary tokens may merge across a template/content boundary, as
they do in the text the model was trained on (a template's "User: " followed by content "Hi" gives one " Hi"
token, as transformers' own apply_chat_template does), but never across a special token; and no special token
comes from content, nor from content joined to the template's text. Contents without special-token text thus
get exactly the ids of the rendered text tokenized whole, as before (that is the path taken whenever the
tokenizer finds exactly the template's special tokens in it; the stretch-by-stretch path, for the rest, reads a
stretch as byte-level BPE reads it in place, which a SentencePiece tokenizer that marks only the text's start
with U+2581 would not: it would add one there).

This holds only if the template places each content as it is. It is checked on every request: rendering the
real messages must give the sentinel rendering with each sentinel replaced by its content. A template that
rewrites content (trims it, say, or branches on it) fails the check; then the rendered text is tokenized whole,
which is safe only if no content holds special-token text and the rendering has exactly the special tokens of
the template's own text, in order; otherwise the request is refused with a 400 (never silently mangled). A
template that refuses the sentinels (one that accepts only certain contents) cannot be checked at all: a 400 too.
The template's own raise_exception ("roles must alternate") is a 400 with its message.
--allow-special-tokens-in-content turns all of this off: the rendered text is tokenized whole, content's
special-token text read as special tokens.
"""
from __future__ import annotations

import functools
import re

from jinja2 import TemplateError

from model_runner.text import encode, encode_offsets

from .errors import APIError

# A sentinel is MARK * k, the message's index, MARK * k, with k one more than the longest run of MARK in any
# content, so that no content holds a sentinel's mark. A private-use character: no template transform (trim,
# upper, capitalize) changes it and no template writes it (checked on every rendering, and k raised if so).
MARK = "\ue000"


def special_tokens(tokenizer) -> dict[str, int]:
    """Text -> id of every special added token: those the tokenizer matches before anything else, and that
    split_special_tokens splits (an added token that is not special is matched in content too, by design)."""
    return {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.content and t.special}


def chat_prompt_ids(messages: list[dict[str, str]], tokenizer, allow_special_tokens: bool = False,
                    add_generation_prompt: bool = True) -> list[int]:
    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
    text = render(tokenizer, messages, add_generation_prompt)
    if allow_special_tokens:
        return encode(tokenizer, text)
    specials = special_tokens(tokenizer)
    if not specials:  # nothing to forge
        return encode(tokenizer, text)
    finder = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    layout = sentinel_layout(tokenizer, messages, add_generation_prompt)
    if layout is None or "".join(messages[p]["content"] if isinstance(p, int) else p for p in layout) != text:
        return rewritten(tokenizer, messages, text, layout, specials, finder)
    return in_place(tokenizer, messages, text, layout, specials, finder)


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as e:  # the template's own raise_exception ("roles must alternate ..."), or its bug
        raise APIError(400, f"this model's chat template refused the messages: {str(e)[:300]}",
                       code="chat_template_error") from None


def sentinel_layout(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> tuple | None:
    """The template rendered with a sentinel as each content: its own text pieces (str) and the message indices
    (int) where contents go, in order. None if the template refuses sentinels or writes marks itself."""
    roles = tuple(m["role"] for m in messages)
    k = 1 + max((len(run) for m in messages for run in re.findall(f"{MARK}+", m["content"])), default=0)
    for mark in (MARK * k, MARK * (k + 1), MARK * (k + 2)):
        try:
            layout = layout_for(tokenizer, tokenizer.chat_template, roles, add_generation_prompt, mark)
        except TemplateError:
            return None
        if layout is not None:
            return layout
    return None


@functools.lru_cache(maxsize=256)
def layout_for(tokenizer, template: str, roles: tuple[str, ...], add_generation_prompt: bool, mark: str):
    """Cached: a layout depends on the template and the roles alone, and every use checks it against the real
    rendering (a template whose output changes by itself, with the date say, fails that check rather than
    being trusted). The template is in the key so that one changed on the tokenizer is rendered afresh."""
    stand_ins = [{"role": r, "content": f"{mark}{i}{mark}"} for i, r in enumerate(roles)]
    text = tokenizer.apply_chat_template(stand_ins, add_generation_prompt=add_generation_prompt, tokenize=False)
    parts = re.split(f"{mark}([0-9]+){mark}", text)  # text, index, text, ..., text
    if any(MARK in p for p in parts[::2]) or any(int(i) >= len(roles) for i in parts[1::2]):
        return None  # the template writes marks itself, or changed a sentinel
    return tuple(p if k % 2 == 0 else int(p) for k, p in enumerate(parts) if p or k % 2)


def in_place(tokenizer, messages, text: str, layout: tuple, specials: dict[str, int], finder) -> list[int]:
    """The rule of the module docstring, for a template that places contents as they are."""
    # Where the template's own special tokens are in text: (start, end, id), found in its pieces alone.
    spans, pos = [], 0
    for p in layout:
        if isinstance(p, int):
            pos += len(messages[p]["content"])
            continue
        spans += [(pos + m.start(), pos + m.end(), specials[m.group()]) for m in finder.finditer(p)]
        pos += len(p)
    whole = tokenized_whole(tokenizer, text, specials)
    if whole is not None and whole[1] == spans:
        return whole[0]  # the tokenizer found exactly the template's special tokens: its ids are the rule's
    ids, pos = [], 0
    for start, end, token in spans:  # each stretch between two template special tokens is plain text
        ids += encode(tokenizer, text[pos:start], split_special_tokens=True) if start > pos else []
        ids.append(token)
        pos = end
    return ids + (encode(tokenizer, text[pos:], split_special_tokens=True) if pos < len(text) else [])


def tokenized_whole(tokenizer, text: str, specials: dict[str, int]) -> tuple[list[int], list] | None:
    """The ids of text with special tokens read as such, and where each special token is: (start, end, id).
    None for a tokenizer without character offsets (a slow one)."""
    if (got := encode_offsets(tokenizer, text)) is None:
        return None
    ids, offsets = got
    special_ids = set(specials.values())
    return ids, [(s, e, i) for i, (s, e) in zip(ids, offsets) if i in special_ids]


def rewritten(tokenizer, messages, text: str, layout: tuple | None, specials: dict[str, int], finder) -> list[int]:
    """A template that does not place contents as they are: the text tokenized whole, if that is safe."""
    if layout is None:
        raise APIError(400, "this model's chat template rejects stand-in contents, so these messages cannot be "
                            "checked for forged special tokens; the operator can serve it with "
                            "--allow-special-tokens-in-content", code="chat_template_unchecked")
    for i, m in enumerate(messages):
        if found := finder.search(m["content"]):
            raise APIError(400, f"messages[{i}].content holds special-token text ({found.group()!r}) and this "
                                "model's chat template rewrites message content, so it cannot be kept as plain "
                                "text: remove it", code="special_tokens_in_content")
    ids, special_ids = encode(tokenizer, text), set(specials.values())
    own = [specials[s] for p in layout if isinstance(p, str) for s in finder.findall(p)]
    if [i for i in ids if i in special_ids] != own:  # content joined to template text made a special token
        raise APIError(400, "this model's chat template rewrites message content, and the result holds special "
                            "tokens the template did not write: remove partial special-token text (such as "
                            f"{min(specials, key=len)[:2]!r}) from the messages' edges",
                       code="special_tokens_in_content")
    return ids
