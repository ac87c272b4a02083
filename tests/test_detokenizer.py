import random
from collections.abc import Sequence

import pytest

from batcher.detokenizer import IncrementalDetokenizer
from model_runner.tiny import byte_level_tokenizer

TEXTS = [
    "Hello, world!",
    " leading spaces and  double  spaces ",
    "line one\nline two\n\n\tindented\r\n",
    "héllo wörld, ça va? naïve façade",
    "你好，世界。日本語のテキスト",
    "party 🎉🎉 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return {'a': [x ** 2, \"\\n\"]}  # done\n",
    "mixed: a é 你 🎉 z",
]


@pytest.fixture(scope="module")
def byte_tok():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def smol_tok():
    from model_runner.loader import load_tokenizer, resolve_model
    return load_tokenizer(resolve_model("smollm2-135m"))


def groups(ids: list[int], rng: random.Random | None) -> list[list[int]]:
    """ids one at a time, or (with rng) in random-sized groups of 1 to 5."""
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5) if rng else 1
        out.append(ids[i:i + n])
        i += n
    return out


def stream(tok, ids: list[int], prompt: Sequence[int] = (), rng: random.Random | None = None,
           **kw) -> tuple[list[str], IncrementalDetokenizer]:
    """All deltas (pushes, then flush) of one generation, and the detokenizer."""
    d = IncrementalDetokenizer(tok, list(prompt), **kw)
    deltas = [d.push(g) for g in groups(ids, rng)]
    return deltas + [d.flush()], d


def check_roundtrip(tok, text: str, prompt: str = "") -> None:
    ids, prompt_ids = tok.encode(text, add_special_tokens=False), tok.encode(prompt, add_special_tokens=False)
    for rng in (None, random.Random(0), random.Random(1)):
        deltas, d = stream(tok, ids, prompt_ids, rng)
        assert "".join(deltas) == d.text == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in x for x in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_deltas_concatenate_to_full_decode(byte_tok, text):
    check_roundtrip(byte_tok, text)
    check_roundtrip(byte_tok, text, prompt="Prompt ending mid-word: caf")


def test_split_character_is_held_until_complete(byte_tok):
    d = IncrementalDetokenizer(byte_tok, [])
    e_acute, party = byte_tok.encode("é"), byte_tok.encode("🎉")
    assert (len(e_acute), len(party)) == (2, 4)  # the byte tokenizer splits them: the case under test
    assert [d.push([t]) for t in byte_tok.encode("a") + e_acute] == ["a", "", "é"]
    assert [d.push([t]) for t in party] == ["", "", "", "🎉"]


def test_incomplete_tail_comes_out_at_flush(byte_tok):
    ids = byte_tok.encode("ok 你")[:-1]  # generation cut off inside a character
    deltas, d = stream(byte_tok, ids)
    assert deltas[-1] == "\ufffd" and d.text == byte_tok.decode(ids) == "ok \ufffd"


def test_random_token_streams_match_full_decode(byte_tok):
    """Any ids at all, invalid UTF-8 and special tokens included, still concatenate to the full decode."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(byte_tok)) for _ in range(rng.randint(0, 30))]
        prompt = [rng.randrange(len(byte_tok)) for _ in range(rng.randint(0, 8))]
        for skip in (True, False):
            deltas, d = stream(byte_tok, ids, prompt, rng, skip_special_tokens=skip)
            assert d.text == "".join(deltas) == byte_tok.decode(ids, skip_special_tokens=skip)


def test_special_tokens(byte_tok):
    end = byte_tok.convert_tokens_to_ids("<|im_end|>")
    ids = byte_tok.encode("hi") + [end] + byte_tok.encode(" yo") + [end]
    prompt = byte_tok.encode(byte_tok.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False,
                                                           add_generation_prompt=True))
    for skip, want in ((True, "hi yo"), (False, "hi<|im_end|> yo<|im_end|>")):
        assert stream(byte_tok, ids, prompt, skip_special_tokens=skip)[1].text == want


def emitted(tok, text: str, stop: tuple[str, ...], rng: random.Random | None = None) -> tuple[list[str], bool]:
    deltas, d = stream(tok, tok.encode(text, add_special_tokens=False), rng=rng, stop=stop)
    assert "".join(deltas) == d.text
    return deltas, d.stopped


def test_stop_across_tokens(byte_tok):
    deltas, stopped = emitted(byte_tok, "Hello ###world", stop=("###",))
    assert stopped and "".join(deltas) == "Hello "
    # "#" and "##" are held while they may start "###": the text before them goes out at once.
    assert deltas[:9] == ["H", "e", "l", "l", "o", " ", "", "", ""]
    assert all(x == "" for x in deltas[9:])


def test_stop_at_the_very_start(byte_tok):
    deltas, stopped = emitted(byte_tok, "STOP and more", stop=("STOP",))
    assert stopped and set(deltas) == {""}


def test_earliest_of_several_stops_wins(byte_tok):
    for stop in (("world", "lo w", "zzz"), ("zzz", "lo w", "world")):
        for rng in (None, random.Random(3)):
            deltas, stopped = emitted(byte_tok, "Hello world", stop=stop, rng=rng)
            assert stopped and "".join(deltas) == "Hel"
    # Matches that begin together: the text ends before both.
    assert emitted(byte_tok, "abcdef", stop=("cdef", "cd"))[0] == ["a", "b", "", "", "", "", ""]


def test_near_miss_is_released(byte_tok):
    deltas, stopped = emitted(byte_tok, "##a###b", stop=("###",))
    assert stopped and deltas[:3] == ["", "", "##a"] and "".join(deltas) == "##a"
    deltas, stopped = emitted(byte_tok, "x##", stop=("###",))
    assert not stopped and deltas == ["x", "", "", "##"]  # the end of the stream is no stop: flush releases it


def test_stop_with_multibyte_characters(byte_tok):
    for rng in (None, random.Random(5)):
        deltas, stopped = emitted(byte_tok, "hé 你好 🎉 after", stop=("你好",), rng=rng)
        assert stopped and "".join(deltas) == "hé "
        deltas, stopped = emitted(byte_tok, "go 🎉!", stop=("🎉",), rng=rng)
        assert stopped and "".join(deltas) == "go "


def test_nothing_after_a_stop(byte_tok):
    d = IncrementalDetokenizer(byte_tok, [], stop=("\n",))
    assert d.push(byte_tok.encode("one\ntwo")) == "one" and d.stopped
    assert d.push(byte_tok.encode("three")) == "" and d.flush() == "" and d.text == "one"


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call is given."""

    def __init__(self, tok) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids: list[int], **kw) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_long_generation_is_linear(byte_tok):
    ids = byte_tok.encode("a line of text, héllo 你好 🎉\n" * 100)[:2000]
    counting = CountingTokenizer(byte_tok)
    d = IncrementalDetokenizer(counting, byte_tok.encode("prompt " * 50), stop=("never appears",))
    text = "".join(d.push([t]) for t in ids) + d.flush()
    assert text == byte_tok.decode(ids)
    # Linear work, counted rather than timed: the decode window stays small whatever the length so far, and
    # each token costs a bounded number of decode calls.
    assert max(counting.sizes) <= 10 and len(counting.sizes) <= 3 * len(ids)


@pytest.mark.integration
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_deltas_concatenate_to_full_decode(smol_tok, text):
    check_roundtrip(smol_tok, text)
    check_roundtrip(smol_tok, text, prompt="Say something:")


@pytest.mark.integration
def test_smollm2_first_token_in_context(smol_tok):
    """A leading space or newline on the first output token decodes as it does inside the whole sequence."""
    prompt = smol_tok.encode(smol_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                           add_generation_prompt=True))
    for text in (" Hello there", "\n\nNew paragraph", "你好 🎉"):
        ids = smol_tok.encode(text, add_special_tokens=False)
        whole, head = smol_tok.decode(prompt + ids), smol_tok.decode(prompt)
        assert stream(smol_tok, ids, prompt)[1].text == whole[len(head):] == text


@pytest.mark.integration
def test_smollm2_stop_inside_one_token(smol_tok):
    ids = smol_tok.encode("Hello wonderful world", add_special_tokens=False)
    assert " wonderful" in [smol_tok.decode([t]) for t in ids]  # one token holds the whole stop string and more
    deltas, d = stream(smol_tok, ids, stop=("nder",))
    assert d.stopped and "".join(deltas) == "Hello wo"
