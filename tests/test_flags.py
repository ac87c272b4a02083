"""No value of a security or limit flag quietly turns its protection off (api/flags.py).

Every `jitney serve` flag that takes a value is listed here, either with what "the protection holds" means for
its parsed value or as not a protection (a completeness check makes a new flag choose). Then, for every such
flag and every value shape that disables things elsewhere (empty, whitespace, 0, negative, nan, inf, overflow)
plus hypothesis' arbitrary text and numbers, parsing either refuses in one `jitney: error:` line naming the
flag (exit 2, no traceback) or gives a value under which the protection holds. All of it is the parser and the
gate alone: no model is loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import shutil
import subprocess
import types

import pytest
from hypothesis import given, settings, strategies as st

from api import flags
from api.gatekeeper import Gatekeeper
from api.settings import ROUTES, ServerSettings
from jitney.cli import build_parser, main, protections, reach
from model_runner.errors import InvalidRequestError


def count(low: int, high: int = 2**63 - 1):
    return lambda v: isinstance(v, int) and low <= v <= high


def finite(low: float, above: bool = False, high: float = math.inf):
    return lambda v: math.isfinite(v) and (v > low if above else v >= low) and v <= high


def text(v) -> bool:
    return bool(v) and v == v.strip()


def key(v) -> bool:
    return bool(v) and all("!" <= c <= "~" for c in v)


# flag -> what its parsed value must satisfy for the protection (or limit) to be on.
PROTECTIONS = {
    "--api-key": lambda v: all(key(k) for k in v),
    "--max-queue": count(1), "--max-num-seqs": count(1),
    "--max-num-batched-tokens": lambda v: v is None or count(1)(v),  # None: auto, the runner's 512 or 2048
    "--max-batch-size": count(1), "--max-model-len": count(1), "--block-size": count(1),
    "--max-headers": count(1), "--max-connections": count(1), "--replicas": count(1),
    "--cpus-per-replica": count(1), "--threads": count(1), "--port": count(0, 65535),
    "--kv-cache-memory": count(1), "--max-body-bytes": count(1), "--max-header-bytes": count(1),
    "--max-rps": finite(0, above=True), "--timeout-s": finite(0, above=True),
    "--body-timeout-s": finite(0, above=True), "--header-timeout-s": finite(0, above=True),
    "--keep-alive-s": finite(0, above=True), "--memory-utilization": finite(0, above=True, high=1),
    "--grace-s": finite(0), "--max-wait-ms": finite(0), "--static-flush-ms": finite(0),
    "--routing-imbalance": finite(0),
    "--host": text, "--ray-address": text, "--ssl-certfile": text, "--ssl-keyfile": text,
    "--served-model-name": text, "--allowed-origins": lambda v: all(text(o) for o in v),
}
# Flags with a value that guard nothing: a choice from a fixed list, or what to load.
# (--chat-template and --config: files read and checked; the rest a choice)
NOT_PROTECTIONS = {"--model", "--device", "--dtype", "--kv-cache-dtype", "--quantization", "--quant-dense-rows",
                   "--quant-dense-weights", "--policy", "--routing", "--chat-template", "--config", "--log-format"}
# The shapes that turned protections off: an unset variable, a typo'd zero or sign, what float() also reads.
SHAPES = ("", " ", "\t", "0", "-0", "0.0", "-1", "-1e-9", "nan", "NaN", "-nan", "inf", "-inf", "Infinity",
          "1e400", "-1e400", " 5", "5 ", "0x10", "1GiB", "-1GiB", "0KiB", ",", "*", "99999999999999999999",
          "--")  # argparse drops a "--" value and stores [] without calling the flag's type


def serve_actions() -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[-1]: a for a in sub.choices["serve"]._actions
            if a.option_strings and a.nargs != 0 and a.dest != "help"}


def parse(flag: str, value: str) -> tuple[object, str]:
    """(the parsed value, or None when refused; what was printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            # "--flag=value": argparse would read a value starting with "-" as another flag
            args = build_parser().parse_args(["serve", f"{flag}={value}"])
        except SystemExit as e:
            assert e.code == 2
            return None, err.getvalue()
    return getattr(args, serve_actions()[flag].dest), err.getvalue()


def check(flag: str, value: str) -> None:
    parsed, err = parse(flag, value)
    if parsed is None:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"jitney: error: argument {flag}"), err
        assert "Traceback" not in err
    else:
        assert err == ""
        assert PROTECTIONS[flag](parsed), f"{flag} {value!r} was accepted as {parsed!r}, which turns it off"


def test_every_flag_with_a_value_is_audited():
    assert set(serve_actions()) == set(PROTECTIONS) | NOT_PROTECTIONS


@pytest.mark.parametrize("flag", sorted(PROTECTIONS))
def test_no_disabling_shape_is_accepted(flag):
    for value in SHAPES:
        check(flag, value)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(PROTECTIONS)),
       st.one_of(st.text(max_size=12), st.floats().map(repr), st.integers(-2**70, 2**70).map(str),
                 st.sampled_from(SHAPES)))
def test_any_value_is_refused_in_one_line_or_keeps_the_protection_on(flag, value):
    check(flag, value)


# --- API keys: the gate refuses every route but /health to a request without one of the keys -------------------

def gate(keys: tuple[str, ...]) -> Gatekeeper:
    return Gatekeeper(types.SimpleNamespace(state=None), ServerSettings(model_name="m", api_keys=keys), None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["", " ", "\t", "key one", "é"]), st.text(max_size=8)),
                min_size=1, max_size=3),
       st.one_of(st.none(), st.sampled_from(["", " ", "Bearer ", "Bearer"]), st.text(max_size=10)))
def test_keys_that_parse_are_asked_of_every_route(given_keys, sent):
    """Whatever --api-key values the parser accepts, a request whose header carries none of them is refused on
    every route but /health; an empty key (which a missing header would match) never gets that far."""
    argv = ["serve"] + [f"--api-key={k}" for k in given_keys]
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            keys = tuple(build_parser().parse_args(argv).api_key)
        except SystemExit:
            return  # refused: nothing served
    g = gate(keys)
    headers = {} if sent is None else {"authorization": sent}
    key_sent = sent[7:] if sent and sent.lower().startswith("bearer ") else ""
    for path in ROUTES:
        refused = g.reject(path, headers)
        if path == "/health" or (key_sent and key_sent in keys):  # sending no key never passes
            continue
        assert refused is not None and refused.status_code == 401, (path, keys, sent)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(["", ",", " ", " , ", "a,", ",a", "a,,b", "a, b", "key one", "ключ"]),
                 st.text(max_size=12)))
def test_jitney_api_key_is_refused_or_puts_keys_on(value):
    """JITNEY_API_KEY set means keys were meant: it either yields at least one valid key, every one of them one
    a client can send, or it is refused in one line; it never leaves the server keyless or open to ''."""
    try:
        keys = flags.env_api_keys({"JITNEY_API_KEY": value})
    except InvalidRequestError as e:
        assert "\n" not in str(e) and "JITNEY_API_KEY" in str(e)
        return
    assert keys and all(key(k) for k in keys), keys
    assert all(gate(keys).reject(p, {}) is not None for p in ROUTES if p != "/health")
    assert flags.env_api_keys({}) == ()


@pytest.mark.parametrize("value", ["", ",", " ", "a,,b", "a,"])
def test_the_command_refuses_an_empty_jitney_api_key_before_loading_anything(value, monkeypatch, capsys):
    monkeypatch.setenv("JITNEY_API_KEY", value)
    assert main(["serve", "--model", "no-such-model"]) == 2  # refused before the model would fail to load
    err = capsys.readouterr().err
    assert err.startswith("jitney: error: JITNEY_API_KEY") and len(err.splitlines()) == 1, err


# --- TLS: a key without its certificate, or files that do not load, are refused up front ------------------------

@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command line")
    d = tmp_path_factory.mktemp("pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True,
                   capture_output=True)
    (d / "both.pem").write_text((d / "cert.pem").read_text() + (d / "key.pem").read_text())
    (d / "junk.pem").write_text("not a certificate")
    return d


@pytest.mark.parametrize("cert", [None, "cert.pem", "both.pem", "key.pem", "junk.pem", "missing.pem"])
@pytest.mark.parametrize("key_", [None, "key.pem", "cert.pem", "junk.pem", "missing.pem"])
def test_tls_is_refused_or_really_on(pem, cert, key_):
    """Either the pair loads into a TLS context (what uvicorn will do) or it is refused in one line."""
    path = lambda name: None if name is None else str(pem / name)
    try:
        flags.check_tls(path(cert), path(key_))
    except InvalidRequestError as e:
        assert "\n" not in str(e) and "--ssl-" in str(e)
        return
    import ssl
    if cert is None:  # nothing given: plain HTTP, as the start-up line says ("TLS off")
        assert key_ is None
        return
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(path(cert), path(key_))
    if key_ is None:
        assert cert == "both.pem"


def test_a_key_without_a_certificate_is_refused_by_the_command(capsys, tmp_path):
    (tmp_path / "k.pem").write_text("x")
    assert main(["serve", "--model", "no-such-model", "--ssl-keyfile", str(tmp_path / "k.pem")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jitney: error: --ssl-keyfile without --ssl-certfile") and len(err.splitlines()) == 1


# --- the start-up line states what is on --------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.text(alphabet="abcXYZ019-_", min_size=1, max_size=6).filter(lambda k: k != "--"),
                     max_size=3),  # "--" is refused (SHAPES)
       rps=st.one_of(st.none(), st.floats(0.01, 1e6)), timeout=st.one_of(st.none(), st.floats(0.01, 1e6)),
       queue=st.integers(1, 10**6), tls=st.booleans(), logged=st.booleans(),
       host=st.sampled_from(["127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "10.1.2.3", "example.com"]))
def test_the_start_up_line_says_exactly_what_is_on(keys, rps, timeout, queue, tls, logged, host):
    argv = ["serve", "--max-queue", str(queue), "--host", host]
    argv += [f"--api-key={k}" for k in keys] + ["--max-rps", repr(rps)] * (rps is not None)
    argv += ["--timeout-s", repr(timeout)] * (timeout is not None) + ["--ssl-certfile", "c.pem"] * tls
    argv += ["--log-requests"] * logged
    args = build_parser().parse_args(argv)
    line = protections(args, tuple(args.api_key or ()))
    n = len(set(keys))
    assert (f"API keys on ({n} key" in line) if keys else ("API keys off" in line)
    assert f"TLS {'on' if tls else 'off'}" in line and f"queue {queue} requests" in line
    assert f"rate limit {rps:g}/s" in line if rps is not None else "rate limit none" in line
    assert f"deadline {timeout:g} s" in line if timeout is not None else "deadline none" in line
    assert ("prompts logged" in line) == logged
    assert f"{'https' if tls else 'http'}://{host}:8000 ({reach(host)})" in line
    assert (reach(host) == "loopback only") == (host in ("127.0.0.1", "::1", "localhost"))
