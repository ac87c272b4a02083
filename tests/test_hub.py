"""--model org/name: Hugging Face Hub ids resolved through huggingface_hub, against a local stand-in for the hub.

The stand-in (StandInHub) is a small HTTP server on 127.0.0.1 speaking the endpoints huggingface_hub's
snapshot_download uses: the revision's info (/api/models/ID/revision/REV), the file tree (/api/models/ID/tree/REV)
and each file (HEAD and GET /ID/resolve/REV/FILE, with the X-Repo-Commit and ETag headers the library keys its
cache on). Nothing here reaches the network: every test points the library at the stand-in or at a dead port.

In-process tests set huggingface_hub's constants the way its environment variables would at import (HF_ENDPOINT,
HF_HUB_CACHE, HF_HUB_OFFLINE are read once, when the library is imported); the end-to-end test runs `jitney
generate` with the real environment variables.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_runner import hub
from model_runner.errors import ModelLoadError
from model_runner.loader import resolve_model

from .server_helpers import REPO, free_port

SHA = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    """The hub's download endpoints over a dict {repo_id: {filename: bytes}}; every request path is recorded."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos, self.requests = repos, []
        hub_ = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(head=True)

            def do_GET(self):
                self.answer(head=False)

            def answer(self, head: bool):
                hub_.requests.append((self.command, self.path))
                path = self.path.split("?")[0]
                body, headers, status = hub_.route(path)
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, path: str) -> tuple[bytes, dict, int]:
        parts = path.strip("/").split("/")
        not_found = (b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound",
                                                           "Content-Type": "application/json"}, 404)
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, kind = "/".join(parts[2:4]), parts[4]
            if repo not in self.repos:
                return not_found
            files = self.repos[repo]
            if kind == "revision":
                info = {"id": repo, "modelId": repo, "sha": SHA, "private": False,
                        "siblings": [{"rfilename": f} for f in files]}
                return json.dumps(info).encode(), {"Content-Type": "application/json"}, 200
            if kind == "tree":
                tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in files.items()]
                return json.dumps(tree).encode(), {"Content-Type": "application/json"}, 200
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo not in self.repos:
                return not_found
            if name not in self.repos[repo]:
                return b"{}", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA}, 404
            body = self.repos[repo][name]
            return body, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}, 200
        return not_found

    def fetched(self) -> set[str]:
        """The files whose contents were downloaded."""
        return {p.split("/resolve/")[1].split("/", 1)[1] for m, p in self.requests if m == "GET" and "/resolve/" in p}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Points huggingface_hub at `endpoint` with an empty cache, as HF_ENDPOINT/HF_HUB_CACHE/HF_HUB_OFFLINE would."""
    from huggingface_hub import constants

    def point(endpoint: str | None, offline: bool = False, cache: Path | None = None) -> Path:
        cache = cache or tmp_path / "hf-cache"
        endpoint = endpoint or f"http://127.0.0.1:{free_port()}"  # nobody listens: a connection error
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(hub, "_resolved", {})  # what this process resolved before: a new process
        return cache

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return point


@pytest.fixture(scope="module")
def tiny_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in resolve_model("tiny-random", progress=False).iterdir() if p.is_file()}


# --- which names are hub ids ---------------------------------------------------------------------------------

# The hub's names: ASCII letters and digits, joined by single '-', '_' or '.' (never at an end, never doubled).
WORD = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=10)
NAME = st.builds(lambda first, rest: first + "".join(sep + w for sep, w in rest), WORD,
                 st.lists(st.tuples(st.sampled_from("-_."), WORD), max_size=3))


@settings(max_examples=200, deadline=None, database=None)
@given(org=NAME, name=NAME)
def test_org_name_is_a_hub_id(org, name):
    assert hub.is_hub_id(f"{org}/{name}")


@settings(max_examples=200, deadline=None, database=None)
@given(org=NAME, name=NAME, shape=st.sampled_from(["{o}", "{o}/{n}/x", "./{o}/{n}", "~/{o}/{n}", "/{o}/{n}",
                                                       "{o}//{n}", "{o}/", "/{n}", "{o}--x/{n}", "{o}/..{n}",
                                                       "{o}/{n}/"]))
def test_paths_and_malformed_ids_are_not_hub_ids(org, name, shape):
    assert not hub.is_hub_id(shape.format(o=org, n=name))


def test_an_existing_path_wins(tmp_path, monkeypatch):
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("acme/tiny") and hub.is_hub_id("acme/other")


# --- downloading: what is fetched, from which repositories --------------------------------------------------

EXTRAS = ["README.md", "modeling_acme.py", "configuration_acme.py", "pytorch_model.bin", ".gitattributes",
          "onnx/model.onnx", "tokenization_acme.py"]
GGUFS = ["acme-Q4_0.gguf", "acme-Q8_0.gguf", "acme-F16.gguf"]


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(with_weights=st.booleans(), extras=st.sets(st.sampled_from(EXTRAS)),
       ggufs=st.sets(st.sampled_from(GGUFS)), data=st.data())
def test_snapshot_fetches_only_what_loading_reads(hub_env, tiny_files, tmp_path_factory, with_weights, extras,
                                                  ggufs, data):
    """Any repository: safetensors (+ config, tokenizer) when it has them, else its one GGUF; never code, never
    .bin, never a second GGUF; and the same answer again offline, without a request."""
    files = dict(tiny_files) if with_weights else {}
    files |= {f: f"not for loading: {f}".encode() for f in extras}
    files |= {f: b"GGUF" + f.encode() for f in ggufs}
    cache = tmp_path_factory.mktemp("hf-cache")
    with StandInHub({"acme/tiny": files}) as stand_in:
        hub_env(stand_in.url, cache=cache)
        if with_weights or len(ggufs) == 1:
            got = hub.resolve("acme/tiny", progress=False)
            want = {f for f in files if f in tiny_files} | (set() if with_weights else set(ggufs))
            assert stand_in.fetched() == want
            if with_weights:
                assert got.is_dir() and (got / "config.json").read_bytes() == tiny_files["config.json"]
            else:
                assert got.name == next(iter(ggufs))
        else:
            with pytest.raises(ModelLoadError) as e:
                hub.resolve("acme/tiny", progress=False)
            msg = str(e.value)
            assert "\n" not in msg and ("several GGUF files" if ggufs else "neither *.safetensors")  in msg
            assert stand_in.fetched() == set()
            return
    assert not any(f.endswith((".py", ".bin", ".onnx")) for f in stand_in.fetched())
    # Offline now (the flag, or a hub that does not answer): the cached snapshot, without a single request.
    hub_env(None, offline=data.draw(st.booleans()), cache=cache)
    assert hub.resolve("acme/tiny", progress=False) == got


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no-connection"])
def test_not_cached_and_no_hub_is_one_line_naming_the_way_out(hub_env, offline):
    cache = hub_env(None, offline=offline)
    with pytest.raises(ModelLoadError) as e:
        resolve_model("acme/tiny", progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "acme/tiny reads as a Hugging Face Hub model id" in msg and "hub could not be reached" in msg
    assert ("HF_HUB_OFFLINE" in msg) == offline and str(cache) in msg and "--model /path/to/" in msg


def test_unknown_repository_says_so(hub_env, tiny_files):
    with StandInHub({"acme/tiny": tiny_files}) as stand_in:
        hub_env(stand_in.url)
        with pytest.raises(ModelLoadError, match=r"'acme/tyni' is neither a local path nor a model on http://"):
            resolve_model("acme/tyni", progress=False)


def test_incomplete_cached_snapshot_is_named(hub_env, tiny_files):
    with StandInHub({"acme/tiny": tiny_files}) as stand_in:
        cache = hub_env(stand_in.url)
        snapshot = hub.resolve("acme/tiny", progress=False)
    (snapshot / "model.safetensors").unlink()  # an interrupted download
    hub_env(None, offline=True, cache=cache)
    with pytest.raises(ModelLoadError, match="cached copy of acme/tiny .* is incomplete"):
        hub.resolve("acme/tiny", progress=False)


def test_a_prepopulated_cache_loads_offline(hub_env, tiny_files, tmp_path):
    """The layout any huggingface_hub download leaves (models--org--name/refs/main, snapshots/REV/...), written
    by hand: loaded with HF_HUB_OFFLINE=1 through the loader's own checks."""
    cache = tmp_path / "prepopulated"
    snapshot = cache / "models--acme--tiny" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for name, body in tiny_files.items():
        (snapshot / name).write_bytes(body)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(SHA)
    hub_env(None, offline=True, cache=cache)
    assert resolve_model("acme/tiny", progress=False) == snapshot
    from model_runner.loader import load_model_dir
    path, weights, tokenizer = load_model_dir("acme/tiny", progress=False)
    assert path == snapshot and tokenizer("hi")["input_ids"]


def test_generate_downloads_from_the_hub(tiny_files, tiny_runner, tmp_path):
    """End to end through the environment variables: `jitney generate --model acme/tiny` downloads from the
    stand-in into HF_HUB_CACHE and generates what the same weights generate as tiny-random here (offline use of
    the cache: test_snapshot_fetches_only_what_loading_reads, test_a_prepopulated_cache_loads_offline)."""
    from batcher.generate import generate
    from model_runner.sampling_params import SamplingParams
    argv = [sys.executable, "-m", "jitney.cli", "generate", "--prompt", "hello", "--max-tokens", "8",
            "--dtype", "float32", "--ignore-eos"]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    run = lambda model, **e: subprocess.run(argv + ["--model", model], env={**env, **e}, cwd=REPO,
                                            capture_output=True, text=True, timeout=300)
    with StandInHub({"acme/tiny": tiny_files}) as stand_in:
        online = run("acme/tiny", HF_ENDPOINT=stand_in.url)
    assert online.returncode == 0, online.stderr
    assert "downloading acme/tiny" in online.stdout + online.stderr
    tok = tiny_runner.tokenizer
    seq = generate(tiny_runner, [tok("hello")["input_ids"]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert online.stdout == tok.decode(seq.output_token_ids, skip_special_tokens=True) + "\n"
