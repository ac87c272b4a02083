"""A malformed model directory is refused in one line (ModelLoadError, `jitney: error: ...` at the CLI), before
anything large is allocated, and loading never runs a model's own code.

The valid base is the tiny random model; each case breaks one thing: a config.json key (every key the runner
reads x every bad shape of value: wrong type, missing, null, zero, negative, huge, non-divisible), the whole
file (not JSON, not UTF-8, an array, too deep, too big), the weights (truncated, a tensor dropped, reshaped,
retyped, duplicated or added), the tokenizer files, the path itself. "Before allocating" is checked under
RLIMIT_AS in a subprocess: with the address space capped a little above what the imports took, any large
allocation fails with torch's own error instead of ModelLoadError, whatever the host's memory.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_runner.config import RunnerConfig
from model_runner.errors import ModelLoadError
from model_runner.paths import cache_dir
from model_runner.runner import ModelRunner
from model_runner.tiny import TINY_CONFIG, tiny_random_dir

REPO = Path(__file__).resolve().parent.parent
HUGE = (2**40, 2**63, 10**30)  # sizes no host holds: each must be refused, never tried

# The keys ModelConfig reads, by kind, with the bad values of every shape for that kind.
INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings")
REQUIRED = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
BAD_INTS = ("64", [64], {"n": 64}, True, 64.0, 16.5, 0, -1, -(2**63), *HUGE)
BAD_NUMBERS = ("1e-5", [1e-5], True, 0, -1e-5, math.nan, math.inf, -math.inf)
BAD_BOOLS = ("false", 0, 1, [], {})
BAD_VALUES = {
    **{k: BAD_INTS for k in INT_KEYS},
    "rms_norm_eps": BAD_NUMBERS,
    "rope_theta": (*BAD_NUMBERS, 1, 0.5),
    "tie_word_embeddings": BAD_BOOLS,
    "attention_bias": (*BAD_BOOLS, True),  # true: config.json promises q/k/v biases the weights lack
    "mlp_bias": (*BAD_BOOLS, True),
    "architectures": ("LlamaForCausalLM", [], [1], [None], ["GPT2LMHeadModel"], {"a": 1}, None),
    "hidden_act": ("gelu", 1, ["silu"], True),
    "eos_token_id": ("0", -1, 320, 2**63, True, 0.0, [0, "1"], [0, -1], [[0]], {"id": 0}),
    "rope_scaling": ("linear", [], 1, {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "linear"},
                     {"rope_type": "linear", "factor": "2"}, {"rope_type": "linear", "factor": 0},
                     {"rope_type": "yarn", "factor": 4.0},
                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192},
                     {"type": ["linear"], "factor": 2.0}),
    "rope_parameters": ("x", [], {"rope_theta": 0}, {"rope_theta": "1e4"},
                        {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
    "quantization_config": ({"quant_method": "gptq", "bits": 4}, "awq"),
}
# Combinations that are each valid alone: heads that do not divide hidden size (no head_dim given), KV heads
# that do not divide heads, an odd head size (rotary embeddings turn pairs), a context no host holds.
NON_DIVISIBLE = ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": None},
                 {"num_attention_heads": 4, "num_key_value_heads": 3},
                 {"num_attention_heads": 6, "num_key_value_heads": 4},
                 {"head_dim": 15}, {"hidden_size": 60, "num_attention_heads": 4, "head_dim": None})
# config.json files that are not a config at all.
BAD_FILES = (b"", b"{", b"{}", b"[1, 2]", b'"LlamaForCausalLM"', b"null", b"42", b"\xff\xfe{\x00}",
             b'{"vocab_size": 320,}', "[" * 100_000 + "]" * 100_000, b" " * (2 << 20))

CASES = ([(k, v) for k, vs in BAD_VALUES.items() for v in vs] + [(k, "<missing>") for k in REQUIRED]
         + [("<combo>", c) for c in NON_DIVISIBLE] + [("<file>", f) for f in BAD_FILES])


def config_bytes(key: str, value) -> bytes:
    """The tiny model's config.json with one case applied."""
    if key == "<file>":
        return value if isinstance(value, bytes) else value.encode()
    cfg = dict(TINY_CONFIG)
    changes = value if key == "<combo>" else {key: value}
    for k, v in changes.items():
        if v is None and key == "<combo>" or v == "<missing>":
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return json.dumps(cfg).encode()


def model_dir(root: Path) -> Path:
    """A copy of the tiny random model (its files small enough to copy per case)."""
    d = root / "model"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(tiny_random_dir(cache_dir()), d)
    return d


def assert_refused(d: Path, **runner) -> str:
    """Loading d fails with ModelLoadError in one line that names the directory."""
    with pytest.raises(ModelLoadError) as e:
        ModelRunner(RunnerConfig(model=str(d), **runner), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    assert str(d) in msg, msg
    return msg


# --- config.json ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return model_dir(tmp_path_factory.mktemp("base"))


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES))
def test_malformed_config_is_refused_in_one_line(base, case):
    key, value = case
    (base / "config.json").write_bytes(config_bytes(key, value))
    msg = assert_refused(base)
    if key not in ("<combo>", "<file>") and key in INT_KEYS + ("rms_norm_eps", "rope_theta", "hidden_act"):
        # The line names what is wrong: the key itself, or (a size the weights contradict, a context no host
        # holds) the weights' shapes or the memory arithmetic that refute it.
        assert key in msg or "shape" in msg or "memory" in msg, msg


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(INT_KEYS), value=st.one_of(st.integers(max_value=0), st.integers(min_value=2**32),
                                                        st.floats(allow_nan=True), st.text(max_size=5),
                                                        st.booleans(), st.lists(st.integers(), max_size=2)))
def test_generated_bad_sizes_are_refused(base, key, value):
    (base / "config.json").write_bytes(config_bytes(key, value))
    assert_refused(base)


LIMITED = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from model_runner.config import RunnerConfig
    from model_runner.errors import ModelLoadError
    from model_runner.runner import ModelRunner
    import transformers, safetensors.torch  # imported before the cap: the cap is for what loading allocates
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    cap = vm + (1 << 30) if hard == resource.RLIM_INFINITY else min(vm + (1 << 30), hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    failures = []
    for d in sys.argv[1:]:
        try:
            ModelRunner(RunnerConfig(model=d), progress=False)
            failures.append(f"{d}: loaded")
        except ModelLoadError as e:
            if "\\n" in str(e):
                failures.append(f"{d}: {e!r} is not one line")
        except BaseException as e:
            failures.append(f"{d}: {type(e).__name__}: {str(e)[:200]}")
    print(json.dumps(failures))
""")


def run_capped(dirs: list[Path]) -> list[str]:
    """Loads each directory in one subprocess whose address space is capped at 1 GiB above its imports."""
    out = subprocess.run([sys.executable, "-c", LIMITED, *map(str, dirs)], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_config_case_is_refused_without_allocating(tmp_path):
    """The whole table, each case a directory (the weights and tokenizer linked, config.json its own)."""
    src = tiny_random_dir(cache_dir())
    dirs = []
    for i, (key, value) in enumerate(CASES):
        d = tmp_path / f"c{i}"
        d.mkdir()
        for f in src.iterdir():
            if f.name != "config.json":
                (d / f.name).symlink_to(f)
        (d / "config.json").write_bytes(config_bytes(key, value))
        dirs.append(d)
    assert run_capped(dirs) == []


def test_weights_and_budgets_no_host_holds_are_refused_with_the_arithmetic(tmp_path):
    """Sparse safetensors files declaring terabytes (consistent with their config.json), and a KV-cache budget or
    context larger than the host: refused from the headers and the flags, before a byte is read."""
    from safetensors.torch import save_file
    from model_runner.tiny import random_weights
    d = tmp_path / "big"
    d.mkdir()
    vocab = 2**32  # x 64 x 4 bytes = 1 TiB for the embeddings alone
    cfg = TINY_CONFIG | {"vocab_size": vocab, "num_hidden_layers": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    w = random_weights(TINY_CONFIG | {"num_hidden_layers": 1}, 0)
    small = {k: v for k, v in w.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    save_file(small, str(d / "layers.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        header = json.dumps({name: {"dtype": "F32", "shape": [vocab, 64], "data_offsets": [0, vocab * 64 * 4]}})
        header += " " * (-len(header) % 8)
        f = d / f"{name.split('.')[-2]}.safetensors"
        f.write_bytes(len(header).to_bytes(8, "little") + header.encode())
        os.truncate(f, 8 + len(header) + vocab * 64 * 4)  # sparse: no disk, no memory
    for t in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_random_dir(cache_dir()) / t, d / t)
    with pytest.raises(ModelLoadError, match=r"loading its weights takes 2,048.00 GiB"):
        ModelRunner(RunnerConfig(model=str(d)), progress=False)
    base = model_dir(tmp_path)
    msg = assert_refused(base, kv_cache_memory=2**50)
    assert "KV cache 1,048,576.00 GiB" in msg and "more than this host's" in msg, msg
    assert run_capped([d]) == []


# --- weights -------------------------------------------------------------------------------------------------

MUTATIONS = ("drop", "reshape", "int8", "int32", "bool", "duplicate", "extra layer", "extra tensor", "truncate")


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mutation=st.sampled_from(MUTATIONS))
def test_weights_that_disagree_with_config_are_refused(tmp_path_factory, data, mutation):
    import torch
    from safetensors.torch import load_file, save_file
    d = model_dir(tmp_path_factory.mktemp("w"))
    f = d / "model.safetensors"
    w = load_file(f)
    name = data.draw(st.sampled_from(sorted(w)), label="tensor")
    if mutation == "truncate":
        raw = f.read_bytes()
        f.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="bytes kept")])
    else:
        if mutation == "drop":
            del w[name]
        elif mutation == "reshape":
            w[name] = torch.zeros(*(n + 1 for n in w[name].shape))
        elif mutation in ("int8", "int32", "bool"):
            w[name] = w[name].to(getattr(torch, mutation))
        elif mutation == "duplicate":
            save_file({name: w[name]}, str(d / "more.safetensors"))
        elif mutation == "extra layer":
            w |= {n.replace("layers.1.", "layers.2."): t.clone() for n, t in w.items() if "layers.1." in n}
        elif mutation == "extra tensor":
            w["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(128)
        save_file(w, str(f))
    assert_refused(d)


# --- tokenizer -----------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(["tokenizer.json", "tokenizer_config.json"]),
       content=st.one_of(st.none(), st.sampled_from([b"", b"{", b"[]", b"\xff\xfe", b'{"model": 1}', b"null"]),
                         st.binary(max_size=64)))
def test_broken_tokenizer_files_are_refused(tmp_path_factory, file, content):
    d = model_dir(tmp_path_factory.mktemp("t"))
    if content is None:
        (d / file).unlink()
    else:
        (d / file).write_bytes(content)
    try:
        runner = ModelRunner(RunnerConfig(model=str(d), kv_cache_memory=1 << 20), progress=False)
    except ModelLoadError as e:
        assert "\n" not in str(e) and str(d) in str(e), str(e)
        return
    # A tokenizer_config.json that says nothing usable leaves transformers' defaults: still the same tokenizer.
    assert file == "tokenizer_config.json" and runner.tokenizer.decode(runner.tokenizer("héllo")["input_ids"]) \
        .endswith("héllo")


def test_no_tokenizer_files_at_all(tmp_path):
    d = model_dir(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / f).unlink()
    assert "has no tokenizer" in assert_refused(d)


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_auto_map_never_runs_the_models_code(tmp_path, where):
    """An auto_map naming a .py file that would write a marker if imported: nothing is imported, nobody is asked
    (stdin answers "y" to transformers' prompt, which must never appear)."""
    d = model_dir(tmp_path)
    marker = tmp_path / "MARKER"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "from transformers import PreTrainedTokenizerFast\n"
                               "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
                               "class EvilConfig:\n    pass\n")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("tokenizer_class", None)
    cfg = dict(TINY_CONFIG)
    if where == "tokenizer_config.json":
        tc["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    else:
        cfg |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                   "AutoTokenizer": [None, "evil.EvilTokenizer"]}}
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "config.json").write_text(json.dumps(cfg))
    code = ("from model_runner.config import RunnerConfig\nfrom model_runner.runner import ModelRunner\n"
            f"r = ModelRunner(RunnerConfig(model={str(d)!r}, kv_cache_memory=1 << 20), progress=False)\n"
            "print('tokenizer', type(r.tokenizer).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, input="y\ny\n", capture_output=True, text=True,
                         timeout=300)
    assert not marker.exists(), "the model's own code ran"
    assert "custom code" not in out.stdout + out.stderr or "jitney never runs" in out.stderr, out.stderr[-2000:]
    assert "[y/N]" not in out.stdout + out.stderr
    if out.returncode:  # refused: in one line that says why
        assert "ModelLoadError" in out.stderr and "never runs a model's own code" in out.stderr, out.stderr[-2000:]
    else:
        assert "EvilTokenizer" not in out.stdout


# --- the path and the CLI ------------------------------------------------------------------------------------

def test_paths_that_are_not_models(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelRunner(RunnerConfig(model=str(tmp_path / "no" / "such" / "dir")), progress=False)
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a .gguf file nor a directory"):
        ModelRunner(RunnerConfig(model=str(tmp_path / "README.md")), progress=False)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        ModelRunner(RunnerConfig(model=str(tmp_path)), progress=False)


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.integers(0, 200_000))
def test_truncated_gguf_is_refused(tmp_path_factory, monkeypatch, keep):
    """The default model's GGUF cut anywhere in its header and metadata (where the reader fails fast)."""
    from model_runner.gguf import smollm2_gguf_path
    d = tmp_path_factory.mktemp("g")
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(d / "cache"))
    with open(smollm2_gguf_path(), "rb") as f:
        (d / "cut.gguf").write_bytes(f.read(keep))
    with pytest.raises(ModelLoadError) as e:
        ModelRunner(RunnerConfig(model=str(d / "cut.gguf")), progress=False)
    assert "\n" not in str(e.value)


def test_cli_says_jitney_error_in_one_line(tmp_path):
    """Through `python -m jitney.cli` (a subprocess each): exit status 2 and one `jitney: error:` line."""
    heads0 = model_dir(tmp_path)
    (heads0 / "config.json").write_text(json.dumps(TINY_CONFIG | {"num_attention_heads": 0}))
    cases = (("generate", tmp_path / "no" / "such" / "dir", "does not exist"),
             ("generate", heads0, "num_attention_heads is 0"),
             ("serve", heads0, "num_attention_heads is 0"))
    procs = []  # started together: each spends its time importing, one core's worth
    for command, model, _ in cases:
        args = ["--prompt", "x"] if command == "generate" else ["--host", "127.0.0.1", "--port", "0"]
        procs.append(subprocess.Popen([sys.executable, "-m", "jitney.cli", command, "--model", str(model), *args],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for proc, (_, _, says) in zip(procs, cases):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, stderr[-2000:]
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("jitney: error: ") and says in last, stderr[-2000:]
