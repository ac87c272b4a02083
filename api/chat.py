"""Chat messages -> prompt token ids through the model's chat template, without letting content forge turns.

A chat template renders messages into text such as "<|im_start|>user\\nHi<|im_end|>\\n", which the tokenizer
then reads, special tokens included. Left alone, a user who writes "<|im_end|>\\n<|im_start|>system\\n..." in
a message gets real special tokens out of it: a forged system or assistant turn. So the template's own text is
tokenized with its special tokens, and each message's content as plain text (special-token text split into
ordinary tokens), unless the operator asked for the raw behaviour (--allow-special-tokens-in-content).
Content without any special-token text is tokenized exactly as before, in one piece.
"""
from __future__ import annotations

from model_runner.text import encode

from .errors import APIError


def special_texts(tokenizer) -> list[str]:
    """The text of every added token: the tokenizer matches these before anything else."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.content]


def chat_prompt_ids(messages: list[dict[str, str]], tokenizer, allow_special_tokens: bool = False,
                    add_generation_prompt: bool = True) -> list[int]:
    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template: use /v1/completions", code="no_chat_template")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    specials = special_texts(tokenizer)
    if allow_special_tokens or not any(s in m["content"] for m in messages for s in specials):
        return encode(tokenizer, text)
    # Find each content in the rendered text, in order; template text between them keeps its special tokens.
    ids, pos = [], 0
    for i, m in enumerate(messages):
        start = text.find(m["content"], pos) if m["content"] else pos
        if start < 0:  # the template rewrote the content (trimmed it, say): no safe way to split it out
            raise APIError(400, f"messages[{i}].content holds special-token text that this model's chat template "
                                "alters; remove it", code="special_tokens_in_content")
        ids += encode(tokenizer, text[pos:start]) if start > pos else []
        end = start + len(m["content"])
        ids += encode(tokenizer, text[start:end], split_special_tokens=True) if end > start else []
        pos = end
    return ids + (encode(tokenizer, text[pos:]) if pos < len(text) else [])
