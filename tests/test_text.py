"""model_runner.text calls the Rust tokenizer directly: the ids and text must be those of the transformers
wrapper, for every kind of text (scripts, emoji, control characters, special-token text, lone surrogates'
neighbours, whitespace runs) and every id sequence (special ids, partial UTF-8 bytes), on both tokenizers the
tests use: the default model's BPE and the tiny model's byte-level one."""
import random

import pytest

from model_runner.loader import load_tokenizer, resolve_model
from model_runner.text import decode, encode
from model_runner.tiny import byte_level_tokenizer

PIECES = ["Hello", " world", "!", "  ", "\t", "\n\n", "naïve", " café", "日本語", "한국어", "العربية", "🎉", "👍🏽",
          "\u200b", "\x00", "\x7f", "é", "ﬁ", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "|>",
          "def f(x):\n    return x", " .", " ,", "'s", "1234567", "http://a.b/c?d=e", "\\u00e9", "\ufffd"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "a", *PIECES]
    for _ in range(n):
        out.append("".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 12))))
        out.append("".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x3000),
                                           rng.randrange(0x1F300, 0x1FAFF)])) for _ in range(rng.randrange(1, 20))))
    return out


@pytest.fixture(scope="module", params=["smollm2", "byte-level"])
def tokenizer(request):
    if request.param == "byte-level":
        return byte_level_tokenizer()
    return load_tokenizer(resolve_model("smollm2-135m", progress=False))


def test_encode_is_the_wrappers(tokenizer):
    for text in texts(300):
        for split in (False, True):
            assert encode(tokenizer, text, split_special_tokens=split) == \
                tokenizer(text, add_special_tokens=False, split_special_tokens=split)["input_ids"], (text, split)
        # a split call must not leave the shared Rust object splitting for the next, default call
        assert encode(tokenizer, text) == tokenizer(text, add_special_tokens=False)["input_ids"], text


def test_decode_is_the_wrappers(tokenizer):
    rng = random.Random(1)
    vocab = len(tokenizer)
    specials = list(tokenizer.all_special_ids)
    cases = [[], *([t] for t in range(0, vocab, max(1, vocab // 500)))]
    for _ in range(500):
        cases.append([rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab)
                      for _ in range(rng.randrange(1, 16))])
    cases += [encode(tokenizer, t) for t in texts(50, seed=2)]
    for ids in cases:
        for skip in (False, True):
            assert decode(tokenizer, ids, skip) == tokenizer.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), (ids, skip)


def test_a_tokenizer_set_to_truncate_goes_through_the_wrapper(tokenizer):
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(3)
    try:
        text = "one two three four five six"
        assert encode(tokenizer, text) == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(encode(tokenizer, text)) > 3
    finally:
        backend.no_truncation()
