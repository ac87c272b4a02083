"""GGUF -> HF conversion, checked against transformers' own GGUF loader."""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
import torch

from model_runner.errors import ModelLoadError
from model_runner.gguf import _llama3_rope_scaling, _unpermute, convert_gguf, smollm2_gguf_path

TEXTS = ["Hello world!", "naïve café — 日本語", "def f(x):\n    return x**2  # square", "🎉👍🏽 party", " \t\ttabs "]


@pytest.fixture(scope="module")
def smollm2() -> pathlib.Path:
    try:
        return smollm2_gguf_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def converted(smollm2: pathlib.Path) -> pathlib.Path:
    """The conversion every load of the default model uses: made once into jitney's cache (a fresh checkout's first
    load converts; the tests share it rather than convert the same file again)."""
    from model_runner.loader import resolve_model
    return resolve_model("smollm2-135m", progress=False)


@pytest.mark.integration
def test_weights_match_transformers_gguf_loader(smollm2: pathlib.Path, converted: pathlib.Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    expected = reference.state_dict()
    ours = load_file(converted / "model.safetensors")
    assert reference.config.tie_word_embeddings
    assert set(ours) == set(expected) - {"lm_head.weight"}  # tied: HF re-creates it from the embeddings
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        assert (tensor - expected[name]).abs().max().item() <= 1e-6, name
    assert not list(converted.parent.glob("*.partial"))  # the temp dir was renamed, not left behind


@pytest.mark.integration
def test_tokenizer_matches_and_keeps_chat_template(smollm2: pathlib.Path, converted: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    ours = AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text
    assert ours.chat_template == gguf.GGUFReader(smollm2).fields["tokenizer.chat_template"].contents()
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["smollm2-135m", "tiny-random"])
def test_named_models_tokenizer_is_the_one_autotokenizer_builds(name: str, smollm2: pathlib.Path) -> None:
    """The named models' tokenizers are built without AutoTokenizer (loader.load_tokenizer, named=True: it skips
    a second of imports at every start). Whatever AutoTokenizer picks for the same directory is the same
    tokenizer: its class, its whole tokenizers state, its special tokens and template, and the ids it gives."""
    from transformers import AutoTokenizer

    from model_runner.loader import load_tokenizer, model_tokenizer, resolve_model
    path = resolve_model(name, progress=False)
    ours, auto = load_tokenizer(path, named=True), AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert type(ours) is type(auto) and type(model_tokenizer(name)) is type(auto)
    assert ours.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert ours.special_tokens_map == auto.special_tokens_map and ours.all_special_ids == auto.all_special_ids
    assert ours.chat_template == auto.chat_template and len(ours) == len(auto)
    assert ours.eos_token_id == auto.eos_token_id and ours.bos_token_id == auto.bos_token_id
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|> after the end"]
    for text in texts:
        assert ours(text)["input_ids"] == auto(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == auto.decode(auto.encode(text)), text
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.integration
def test_config_loads(converted: pathlib.Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(converted)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.vocab_size, config.head_dim, config.max_position_embeddings) == (49152, 64, 8192)
    assert config.tie_word_embeddings and config.rms_norm_eps == 1e-5


def _write_gguf(path: pathlib.Path, arch: str, tensors: dict[str, np.ndarray], **raw_dtypes) -> pathlib.Path:
    writer = gguf.GGUFWriter(path, arch)
    if arch == "llama":
        writer.add_context_length(64)
        writer.add_embedding_length(32)
        writer.add_feed_forward_length(32)
        writer.add_block_count(1)
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_layer_norm_rms_eps(1e-5)
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtypes.get(name.replace(".", "_")))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_llama_tensors() -> dict[str, np.ndarray]:
    """HF-shaped [out, in] float32 weights of a 1-layer llama: hidden 32, 2 heads, 1 kv head of dim 16, vocab 8."""
    shapes = {"token_embd.weight": (8, 32), "output_norm.weight": (32,), "blk.0.attn_norm.weight": (32,),
              "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (16, 32), "blk.0.attn_v.weight": (16, 32),
              "blk.0.attn_output.weight": (32, 32), "blk.0.ffn_norm.weight": (32,), "blk.0.ffn_gate.weight": (32, 32),
              "blk.0.ffn_up.weight": (32, 32), "blk.0.ffn_down.weight": (32, 32)}  # fmt: skip
    return {name: np.ones(shape, dtype=np.float32) for name, shape in shapes.items()}


@pytest.mark.integration
def test_truncated_gguf_is_rejected(smollm2: pathlib.Path, tmp_path: pathlib.Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelLoadError, match="truncated"):
        convert_gguf(truncated, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_files_are_rejected(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        convert_gguf(garbage, tmp_path / "out")
    gpt2 = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 8), dtype=np.float32)})
    with pytest.raises(ModelLoadError, match="architecture 'gpt2'.*only Llama"):
        convert_gguf(gpt2, tmp_path / "out")
    assert set(tmp_path.iterdir()) == {garbage, gpt2}  # no output or temp dir left behind


def test_incomplete_or_unsupported_llama_is_rejected(tmp_path: pathlib.Path) -> None:
    tensors = _tiny_llama_tensors()
    del tensors["blk.0.ffn_up.weight"]
    incomplete = _write_gguf(tmp_path / "incomplete.gguf", "llama", tensors)
    with pytest.raises(ModelLoadError, match=r"lacks required tensors \['blk.0.ffn_up.weight'\]"):
        convert_gguf(incomplete, tmp_path / "out")

    tensors = _tiny_llama_tensors()
    # Q8_1 is a valid GGML type the gguf package cannot dequantize; 32 rows of one 32-value block each
    q8_1_type = gguf.GGMLQuantizationType.Q8_1
    tensors["blk.0.ffn_up.weight"] = np.zeros((32, gguf.GGML_QUANT_SIZES[q8_1_type][1]), dtype=np.uint8)
    q8_1 = _write_gguf(tmp_path / "q8_1.gguf", "llama", tensors, blk_0_ffn_up_weight=q8_1_type)
    with pytest.raises(ModelLoadError, match=r"\['Q8_1'\] that the gguf package cannot dequantize"):
        convert_gguf(q8_1, tmp_path / "out")


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(6 * 16 * 5, dtype=np.float32).reshape(6 * 16, 5)
    for n_head in (1, 2, 6):
        # llama.cpp convert_hf_to_gguf.LlamaModel.permute
        permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(_unpermute(permuted, n_head), w)


@pytest.mark.parametrize(
    "theta, head_dim, params",
    [
        (500000.0, 128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),  # Llama 3.1
        (500000.0, 64, {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),  # Llama 3.2 1B
        (10000.0, 64, {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}),
    ],
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(theta: float, head_dim: int, params: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", **params, "original_max_position_embeddings": 8192}
    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=131072,
        rope_parameters={"rope_theta": theta, **scaling},
    )  # fmt: skip
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    divisors = (plain / scaled.double()).float().numpy()  # what llama.cpp stores as rope_freqs.weight
    assert _llama3_rope_scaling(divisors, theta, head_dim, 8192, "test") == scaling
    assert _llama3_rope_scaling(np.ones(head_dim // 2, dtype=np.float32), theta, head_dim, 8192, "test") is None
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        _llama3_rope_scaling(np.linspace(1, 8, head_dim // 2), theta, head_dim, 8192, "test")
