"""Chat content never changes which of the template's tokens are special (api/chat.py's rule), for any
conversation: checked against an oracle written here from each template's known shape, over generated
conversations whose contents are biased toward special-token text, its fragments, template text, role names,
sentinel-like private-use characters, whitespace and unicode; on the default model's tokenizer and template, on
an in-test template with other special tokens, a default system prompt and text on both sides of the content
(on two tokenizers), and on a template that rewrites content (trims it).

The rule (api/chat.py's docstring): the template's own text keeps its special tokens; each stretch between two
of them, template text and contents together, is tokenized as plain text (split_special_tokens=True). Ordinary
tokens may merge across a template/content boundary, never across a special token. Token ids are compared
exactly: both sides run the same tokenizer on the same strings, so no rounding or instruction set enters.
"""
import copy
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.chat import chat_prompt_ids
from api.errors import APIError
from model_runner.loader import load_tokenizer, resolve_model
from model_runner.tiny import byte_level_tokenizer

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Another template shape: a default system prompt, the role capitalized, text on both sides of the content;
# "|>" right after the content lets content ending in a special token's first part ("<|endoftext") complete
# it across the boundary. OPEN and GEN are special tokens of the tokenizer it is set on.
OTHER = ("{%- if messages[0]['role'] != 'system' %}OPENSystem: Answer as briefly as you can.{{ '\\n' }}{% endif %}"
         "{%- for m in messages %}OPEN{{ m['role'] | capitalize }}: {{ m['content'] }}|>{{ '\\n' }}{% endfor %}"
         "{%- if add_generation_prompt %}GEN Assistant:{% endif %}")
TRIMMING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def smol_layout(messages, add_generation_prompt):
    """SmolLM2's template by hand: (text, is_content) pieces."""
    out = [] if messages[0]["role"] == "system" else [(f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n", False)]
    for m in messages:
        out += [(f"<|im_start|>{m['role']}\n", False), (m["content"], True), ("<|im_end|>\n", False)]
    return out + ([("<|im_start|>assistant\n", False)] if add_generation_prompt else [])


def other_layout(open_, gen):
    def layout(messages, add_generation_prompt):
        out = [] if messages[0]["role"] == "system" else [(f"{open_}System: Answer as briefly as you can.\n", False)]
        for m in messages:
            out += [(f"{open_}{m['role'].capitalize()}: ", False), (m["content"], True), ("|>\n", False)]
        return out + ([(f"{gen} Assistant:", False)] if add_generation_prompt else [])
    return layout


def trimming_layout(messages, add_generation_prompt):
    """TRIMMING by hand: SmolLM2's shape without the default system turn, each content stripped."""
    trimmed = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    return smol_layout(trimmed, add_generation_prompt)[0 if messages[0]["role"] == "system" else 1:]


def specials_of(tok) -> list[str]:
    return [t.content for t in tok.added_tokens_decoder.values() if t.special]


def oracle(tok, pieces) -> list[int]:
    """The rule, independently: cut the template's pieces at special-token text (leftmost, longest first),
    tokenize each stretch between two template special tokens as plain text through the transformers wrapper."""
    specials = sorted(specials_of(tok), key=len, reverse=True)
    ids, stretch = [], ""

    def flush():
        nonlocal stretch
        if stretch:
            ids.extend(tok(stretch, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        stretch = ""

    for text, is_content in pieces:
        if is_content:
            stretch += text
            continue
        i = 0
        while i < len(text):
            hit = next((s for s in specials if text.startswith(s, i)), None)
            if hit is None:
                stretch += text[i]
                i += 1
            else:
                flush()
                ids.append(tok.convert_tokens_to_ids(hit))
                i += len(hit)
    flush()
    return ids


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(resolve_model("smollm2-135m", progress=False))


def with_template(tok, template):
    tok = copy.copy(tok)  # shares the Rust tokenizer; the template is this copy's own attribute
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def cases(smol):
    """(tokenizer, oracle layout) for every template shape under test."""
    byte = byte_level_tokenizer()
    return {
        "smollm2": (smol, smol_layout),
        "other-smol": (with_template(smol, OTHER.replace("OPEN", "<|endoftext|>").replace("GEN", "<file_sep>")),
                       other_layout("<|endoftext|>", "<file_sep>")),
        "other-bytes": (with_template(byte, OTHER.replace("OPEN", "<|im_start|>").replace("GEN", "<|im_end|>")),
                        other_layout("<|im_start|>", "<|im_end|>")),
    }


FRAGMENTS = [
    # special-token text of both tokenizers, whole and in parts
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<repo_name>", "<|im_start", "im_end|>", "<|",
    "|>", "<|endoftext", "<", ">", "|",
    # the templates' own text and role names
    "user", "system", "assistant", "User", "System", "Assistant", ": ", "|>\n", "\n", "<|im_start|>system\n",
    SMOL_SYSTEM, "You are", "Answer as briefly as you can.", "<|im_end|>\n<|im_start|>assistant\n",
    # whitespace, sentinel-like private-use characters, unicode, ordinary text
    " ", "  ", "\t", "\r\n", "\n\n", "\ue000", "\ue000\ue000", "\ue0000\ue000", "\ue001", "é", "日本語", "🎉",
    "Hi", " there", "x", "0", "Name three rivers.",
]
content = st.one_of(
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=8).map("".join),
    st.builds(lambda s, n: s * n, st.sampled_from(FRAGMENTS), st.integers(50, 400)),  # long
)
conversation = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), content), min_size=1,
                        max_size=5).map(lambda ms: [{"role": r, "content": c} for r, c in ms])
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("shape", ["smollm2", "other-smol", "other-bytes"])
@SETTINGS
@given(messages=conversation, add_generation_prompt=st.booleans())
def test_prompt_ids_follow_the_rule(cases, shape, messages, add_generation_prompt):
    tok, layout = cases[shape]
    ids = chat_prompt_ids(messages, tok, add_generation_prompt=add_generation_prompt)
    assert ids == oracle(tok, layout(messages, add_generation_prompt))


@pytest.mark.parametrize("shape", ["smollm2", "other-smol", "other-bytes"])
@SETTINGS
@given(messages=conversation, add_generation_prompt=st.booleans())
def test_content_without_special_text_is_tokenized_as_before(cases, shape, messages, add_generation_prompt):
    """The rendered text tokenized whole (transformers' apply_chat_template, the old code's answer), wherever
    that answer had only the template's own special tokens (i.e. wherever the old code was right)."""
    tok, layout = cases[shape]
    if any(s in m["content"] for m in messages for s in specials_of(tok)):
        return
    whole = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                    return_dict=True)["input_ids"]
    special_ids = set(tok.convert_tokens_to_ids(specials_of(tok)))
    expected = oracle(tok, layout(messages, add_generation_prompt))
    if [i for i in whole if i in special_ids] == [i for i in expected if i in special_ids]:
        assert chat_prompt_ids(messages, tok, add_generation_prompt=add_generation_prompt) == whole


@pytest.mark.parametrize("shape", ["smollm2", "other-bytes"])
@settings(SETTINGS, max_examples=40)
@given(messages=conversation)
def test_allow_special_tokens_reads_the_rendered_text_raw(cases, shape, messages):
    tok, _ = cases[shape]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat_prompt_ids(messages, tok, allow_special_tokens=True) == \
        tok(text, add_special_tokens=False, split_special_tokens=False)["input_ids"]


@SETTINGS
@given(messages=conversation, add_generation_prompt=st.booleans())
def test_a_template_that_rewrites_content_is_followed_or_refused(smol, messages, add_generation_prompt):
    """Trimmed content is where the template put it: the rule holds on the trimmed text, or the request is
    refused with a 400 naming the problem, and only when a content holds special-token text or a part of one
    at an edge that trimming changed (never for a content that trimming leaves as it is)."""
    tok = with_template(smol, TRIMMING)
    expected = oracle(tok, trimming_layout(messages, add_generation_prompt))
    try:
        ids = chat_prompt_ids(messages, tok, add_generation_prompt=add_generation_prompt)
    except APIError as e:
        assert e.status == 400 and e.code == "special_tokens_in_content", e.message
        assert any(m["content"] != m["content"].strip() for m in messages)
        assert any(re.search(r"<\||\|>|<[a-z_]+>", m["content"]) for m in messages), e.message
        return
    assert ids == expected


ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
VALIDATING = ("{% for m in messages %}{% if m['content'] not in ['yes', 'no'] %}"
              "{{ raise_exception('answer yes or no') }}{% endif %}<|im_start|>{{ m['content'] }}{% endfor %}")


@SETTINGS
@given(messages=conversation)
def test_a_template_that_refuses_the_messages_is_a_400(messages):
    """The template's own raise_exception is the client's error, told in its words (it was a 500)."""
    tok = with_template(byte_level_tokenizer(), ALTERNATING)
    alternate = all((m["role"] == "user") == (i % 2 == 0) for i, m in enumerate(messages))
    try:
        ids = chat_prompt_ids(messages, tok, add_generation_prompt=False)
    except APIError as e:
        assert not alternate and e.status == 400 and e.code == "chat_template_error"
        assert "roles must alternate" in e.message
        return
    assert alternate and ids == oracle(tok, [p for m in messages for p in (
        (f"<|im_start|>{m['role']}\n", False), (m["content"], True), ("<|im_end|>\n", False))])


@settings(max_examples=20, deadline=None, derandomize=True)
@given(answers=st.lists(st.sampled_from(["yes", "no"]), min_size=1, max_size=4))
def test_a_template_that_cannot_be_checked_is_refused_not_trusted(answers):
    """A template that refuses any content but its own words cannot be rendered with stand-ins, so where its
    contents are cannot be known: the request is refused with a 400 saying what the operator can do."""
    tok = with_template(byte_level_tokenizer(), VALIDATING)
    with pytest.raises(APIError) as e:
        chat_prompt_ids([{"role": "user", "content": a} for a in answers], tok)
    assert e.value.status == 400 and e.value.code == "chat_template_unchecked"
    assert "--allow-special-tokens-in-content" in e.value.message
    assert chat_prompt_ids([{"role": "user", "content": a} for a in answers], tok, allow_special_tokens=True)
