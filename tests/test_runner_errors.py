"""Bad input to the runner is refused with a clear, typed error, never a crash deep in torch."""
import json

import pytest

from model_runner.config import RunnerConfig
from model_runner.errors import InvalidRequestError, ModelLoadError
from batcher.generate import generate
from model_runner.paths import cache_dir
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams
from model_runner.tiny import tiny_random_dir


def test_empty_prompt(tiny_runner):
    with pytest.raises(InvalidRequestError, match="empty"):
        generate(tiny_runner, [[]], SamplingParams())


def test_prompt_longer_than_context(tiny_runner):
    with pytest.raises(InvalidRequestError, match="context window is 1024"):
        generate(tiny_runner, [[5] * 1024], SamplingParams())


def test_token_outside_vocabulary(tiny_runner):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        tiny_runner.check_prompt([5, 100_000])


def test_bad_sampling_params(tiny_runner):
    with pytest.raises(InvalidRequestError, match="top_p"):
        generate(tiny_runner, [[5, 6]], SamplingParams(top_p=0.0))


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model 'llama-9000'"):
        ModelRunner(RunnerConfig(model="llama-9000"), progress=False)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such GGUF"):
        ModelRunner(RunnerConfig(model=str(tmp_path / "absent.gguf")), progress=False)


def test_non_llama_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        ModelRunner(RunnerConfig(model=str(tmp_path)), progress=False)


def test_directory_without_weights(tmp_path):
    src = tiny_random_dir(cache_dir())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    with pytest.raises(ModelLoadError, match="safetensors"):
        ModelRunner(RunnerConfig(model=str(tmp_path)), progress=False)


def test_unknown_dtype_and_missing_cuda():
    with pytest.raises(ModelLoadError, match="dtype"):
        ModelRunner(RunnerConfig(model="tiny-random", dtype="int3"), progress=False)
    with pytest.raises(ModelLoadError, match="float16 is for CUDA"):
        ModelRunner(RunnerConfig(model="tiny-random", dtype="float16"), progress=False)


def test_cli_reports_errors_without_traceback(capsys):
    from jitney.cli import main
    assert main(["generate", "--model", "nope", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and "Traceback" not in err


def test_concurrent_gguf_conversion_uses_the_winners_copy(tmp_path, monkeypatch):
    """Two processes converting the same GGUF: the one that loses the final rename uses the other's copy."""
    import model_runner.gguf as gguf
    from model_runner import loader
    src = tmp_path / "m.gguf"
    src.write_bytes(b"not really a gguf")
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path / "cache"))

    def lose_the_race(path, out, progress):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # the other process's finished conversion
        raise OSError("Directory not empty")

    monkeypatch.setattr(gguf, "convert_gguf", lose_the_race)
    out = loader._converted_gguf(src, progress=False)
    assert (out / "config.json").is_file()

    def fail(path, out, progress):
        raise ModelLoadError("corrupt")

    monkeypatch.setattr(gguf, "convert_gguf", fail)
    src.write_bytes(b"another file")  # a new digest: nobody converted it
    with pytest.raises(ModelLoadError, match="corrupt"):
        loader._converted_gguf(src, progress=False)
