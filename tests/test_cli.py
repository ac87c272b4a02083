"""The command line as an operator meets it: --config files, typos, the help tree, start-up preconditions checked
before the model loads (the port, the cache directory), JSON logs, --chat-template and GET /version.

Parsing tests run in-process (cheap, hypothesis over generated flag sets and files); the server tests share one
tiny-random server, plus one short-lived process for the port already in use.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import socket
import subprocess
import sys

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import flags
from jitney.cli import build_parser, main, parse
from tests.server_helpers import REPO, ServerProcess, wait_until


def refusal(argv: list[str]) -> str:
    """The stderr of a parse that must be refused: exit 2, exactly one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2, err.getvalue()
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jitney: error: "), err.getvalue()
    return lines[0]


def write(tmp_path, data: dict, fmt: str, name: str = "jitney") -> str:
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "toml":
        def value(v):
            if isinstance(v, list):
                return "[" + ", ".join(value(x) for x in v) + "]"
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):  # a TOML basic string: control characters and DEL escaped
                return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c
                                     for c in v) + '"'
            return repr(v)
        path.write_text("".join(f"{k} = {value(v)}\n" for k, v in data.items()))
    else:
        path.write_text(yaml.safe_dump(data))
    return str(path)


# --- --config: precedence, both formats, repeatable flags ------------------------------------------------------

# Flag -> values a file or the command line may give it (parsed value == the value, or the list for api_key).
SETTABLE = {
    "max_num_seqs": st.integers(1, 10**6), "max_batch_size": st.integers(1, 4096),
    "max_wait_ms": st.floats(0, 1e4, allow_nan=False).map(lambda x: round(x, 3)),
    "policy": st.sampled_from(["sequential", "static", "dynamic", "continuous"]),
    "host": st.sampled_from(["127.0.0.1", "::1", "localhost"]), "port": st.integers(0, 65535),
    "served_model_name": st.text("abcxyz-_./0123", min_size=1, max_size=12).filter(lambda s: s == s.strip()),
    "no_prefix_caching": st.booleans(), "log_requests": st.booleans(),
    "api_key": st.lists(st.text("abcXYZ019-_", min_size=1, max_size=6).filter(lambda k: k != "--"), min_size=1,
                        max_size=3),
    "allowed_origins": st.lists(st.sampled_from(["https://a.example", "http://b.example:8080"]), min_size=1,
                                max_size=2),
    "log_format": st.sampled_from(["text", "json"]),
}


def cli_words(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag] * value
    if key == "api_key":
        return [w for k in value for w in (f"{flag}={k}",)]
    if key == "allowed_origins":
        return [flag, *value]
    return [f"{flag}={value}"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), fmt=st.sampled_from(["yaml", "yml", "toml"]), dashes=st.booleans())
def test_a_config_file_sets_every_flag_and_the_command_line_wins(tmp_path, data, fmt, dashes):
    in_file = data.draw(st.dictionaries(st.sampled_from(list(SETTABLE)), st.none(), max_size=len(SETTABLE)))
    in_file = {k: data.draw(SETTABLE[k]) for k in in_file}
    on_cli = data.draw(st.dictionaries(st.sampled_from(list(SETTABLE)), st.none(), max_size=4))
    on_cli = {k: data.draw(SETTABLE[k]) for k in on_cli}
    path = write(tmp_path, {(k.replace("_", "-") if dashes else k): v for k, v in in_file.items()}, fmt)
    argv = ["serve", "--config", path] + [w for k, v in on_cli.items() for w in cli_words(k, v)]
    args, _ = parse(argv)
    default, _ = parse(["serve"])
    for key in SETTABLE:
        want = on_cli[key] if key in on_cli else in_file[key] if key in in_file else getattr(default, key)
        if isinstance(want, bool) and not want and key in on_cli:  # a switch left off on the command line:
            want = in_file.get(key, False)                          # not given there, so the file's holds
        assert getattr(args, key) == want, (key, in_file, on_cli)


@pytest.mark.parametrize("fmt", ["yaml", "toml"])
def test_config_key_typos_are_refused_with_the_closest_flag(tmp_path, fmt):
    for key, meant in [("max_num_seq", "max_num_seqs"), ("max-batch-sise", "max_batch_size"),
                       ("apikey", "api_key"), ("polcy", "policy")]:
        line = refusal(["serve", "--config", write(tmp_path, {key: 1}, fmt)])
        assert f"unknown key '{key}' (did you mean {meant}?)" in line, line
    line = refusal(["serve", "--config", write(tmp_path, {"zzzz": 1}, fmt)])
    assert "unknown key 'zzzz'" in line and "did you mean" not in line


def serve_value_actions() -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in build_parser().commands["serve"]._actions
            if a.option_strings and a.nargs != 0 and a.dest not in ("help", "config")
            and a.type is not flags.chat_template}


BAD = ("", " ", "0", "-1", "nan", "inf", "1e400", " 5", "0x10", "-1GiB", "*", "99999999999999999999", "--")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(sorted(serve_value_actions())), value=st.one_of(st.sampled_from(BAD), st.text(max_size=8)),
       fmt=st.sampled_from(["yaml", "toml"]))
def test_a_config_value_gets_exactly_the_command_lines_check(tmp_path, flag, value, fmt):
    """The same value refused on the command line is refused from the file with the same reason, and one the
    command line accepts is parsed to the same thing from the file."""
    action = serve_value_actions()[flag]
    key = flag[2:].replace("-", "_")
    try:
        cli, _ = parse(["serve", f"{flag}={value}"])
        cli_error = None
    except SystemExit:
        cli, cli_error = None, refusal(["serve", f"{flag}={value}"])
    file_value = [value] if (action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)) else value
    path = write(tmp_path, {key: file_value}, fmt)
    if cli_error is None:
        assert getattr(parse(["serve", "--config", path])[0], action.dest) == getattr(cli, action.dest)
        return
    line = refusal(["serve", "--config", path])
    reason = re.sub(r"^jitney: error: argument [^:]+: ", "", cli_error).removesuffix(" (see jitney serve --help)")
    assert line.startswith(f"jitney: error: {path}: {key}: "), line
    if value != "--":  # "--" is argparse's; from a file it is a plain string, checked by the flag's own type
        assert reason.replace("invalid choice: ", "").split(" (")[0].strip("'") in line, (line, cli_error)


@pytest.mark.parametrize("text, says", [
    ("max_num_seqs: [1, 2]\n", "takes one value, not a list"), ("no_prefix_caching: 1\n", "want true or false"),
    ("max_num_seqs: null\n", "leave the key out"), ("api_key: []\n", "an empty list"),
    ("- a\n- b\n", "want a mapping"), ("max_num_seqs: [\n", "not valid YAML"), ("max_num_seqs: {a: 1}\n", "got dict")])
def test_malformed_config_files_are_refused_in_one_line(tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert says in refusal(["serve", "--config", str(path)])


def test_config_file_itself_refused_in_one_line(tmp_path):
    assert "name a .yaml, .yml or .toml file" in refusal(["serve", "--config", str(tmp_path / "c.json")])
    assert "cannot read it" in refusal(["serve", "--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "a.toml").write_text("x = = 1\n")
    assert "not valid TOML" in refusal(["serve", "--config", str(tmp_path / "a.toml")])
    (tmp_path / "ok.yaml").write_text("max_num_seqs: 2\n")
    assert "given 2 times" in refusal(["serve", "--config", str(tmp_path / "ok.yaml"),
                                       f"--config={tmp_path / 'ok.yaml'}"])


def test_generate_reads_a_config_file_too(tmp_path):
    path = write(tmp_path, {"prompt": "-starts with a dash", "max-tokens": 3, "chat": True}, "toml")
    args, _ = parse(["generate", "--config", path, "--max-tokens", "5"])
    assert (args.prompt, args.max_tokens, args.chat) == ("-starts with a dash", 5, True)


# --- typos on the command line: one line with the flag meant --------------------------------------------------

def typos(word: str) -> st.SearchStrategy[str]:
    """word with one letter dropped, doubled or swapped with the next (what a hand does)."""
    body = word[2:]
    i = st.integers(0, len(body) - 1)
    return st.one_of(i.map(lambda k: body[:k] + body[k + 1:]), i.map(lambda k: body[:k] + body[k] + body[k:]),
                     i.filter(lambda k: k < len(body) - 1).map(
                         lambda k: body[:k] + body[k + 1] + body[k] + body[k + 2:])).map(lambda b: "--" + b)


def long_flags(command: str) -> list[str]:
    return sorted(o for a in build_parser().commands[command]._actions for o in a.option_strings
                  if o.startswith("--") and len(o) > 6 and o != "--help")


@settings(max_examples=100, deadline=None)
@given(data=st.data(), command=st.sampled_from(["serve", "generate"]))
def test_a_mistyped_flag_is_refused_naming_a_flag_that_exists(data, command):
    flag = data.draw(st.sampled_from(long_flags(command)))
    typo = data.draw(typos(flag))
    known = set(long_flags(command)) | {"-h", "--help"}
    if typo in known:
        return
    line = refusal([command, typo, "1"] + (["--prompt", "x"] if command == "generate" else []))
    assert f"unrecognized argument {typo}" in line, line  # no prefix is taken for a flag (no abbreviations)
    suggested = re.search(r"did you mean (\S+)\?", line)
    assert suggested and suggested.group(1) in known, line


def test_the_briefs_examples():
    assert "unrecognized argument --max-num-seq (did you mean --max-num-seqs?)" in \
        refusal(["serve", "--max-num-seq", "4"])
    assert "invalid choice: 'serv' (did you mean serve?)" in refusal(["serv"])
    assert "invalid choice: 'continous' (did you mean continuous?)" in refusal(["serve", "--policy", "continous"])


def test_bench_typos_get_a_suggestion_too(capsys):
    from benchmarks.bench import main as bench_main
    with pytest.raises(SystemExit) as e:
        bench_main(["--num-request", "3"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("jitney bench: error: unrecognized argument --num-request (did you mean --num-requests?)")


# --- every subcommand is in its parent's help -------------------------------------------------------------------

def test_every_subcommand_is_listed_in_its_parents_help(capsys):
    """Walks jitney's parser tree, and bench's own words (benchmarks/bench.py SUBCOMMANDS)."""
    from benchmarks import bench

    def walk(parser: argparse.ArgumentParser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                text = parser.format_help()
                for name, child in action.choices.items():
                    assert re.search(rf"^\s+{name}\s", text, re.M), f"{name} missing from {parser.prog}'s help"
                    yield from walk(child)
        yield parser

    assert len(list(walk(build_parser()))) == 7  # jitney, generate, serve, bench, simulate, plan, view
    text = bench.build_parser().format_help()
    assert bench.SUBCOMMANDS and all(f"jitney bench {name}" in text for name in bench.SUBCOMMANDS)
    for name in bench.SUBCOMMANDS:  # and each is what main() hands the words to
        with pytest.raises(SystemExit) as e:
            bench.main([name, "--help"])
        assert e.value.code == 0 and f"usage: jitney bench {name}" in capsys.readouterr().out


# --- preconditions before the model loads ----------------------------------------------------------------------

def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path):
    """Old code: the model loaded, 'serving on' was printed, then uvicorn's bind failed (exit 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "jitney.cli", "serve", "--model", "tiny-random", "--port",
                              str(port)], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, "JITNEY_CACHE_DIR": str(tmp_path / "cache")})
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    lines = run.stderr.splitlines()
    assert lines == [f"jitney: error: cannot listen on 127.0.0.1:{port} (Address already in use): another "
                     "process listens there: stop it, or give another --port (0 = any free one)"], out
    assert "jitney: model" not in out and "serving on" not in out and "startup" not in out.lower(), out
    assert not (tmp_path / "cache").exists()  # the tiny model was never even built


def test_an_unwritable_cache_dir_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("JITNEY_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    assert main(["serve", "--model", "tiny-random", "--port", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("jitney: error: JITNEY_CACHE_DIR") and "not a writable" in err[0]


# --- --chat-template --------------------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(marker=st.text("abcdefghij<>|[]: ", min_size=1, max_size=10),
       broken=st.sampled_from(["{% for m in messages %}", "{{ messages[0].content ", "{% if %}{% endif %}",
                               "{{ raise_exception('no') }}", "{{ messages[9].content.upper() }}", "{{ 1 / 0 }}",
                               "{% for m in messages %}{{ m.role }}{% endfor %}"]))
def test_a_chat_template_is_rendered_at_start_or_refused_in_one_line(tmp_path_factory, marker, broken):
    d = tmp_path_factory.mktemp("t")
    good, bad = d / "good.jinja", d / "bad.jinja"
    good.write_text("{% for m in messages %}" + marker + "{{ m.role }}:{{ m.content }}\n{% endfor %}"
                    "{% if add_generation_prompt %}" + marker + "assistant:{% endif %}")
    bad.write_text(broken)
    assert flags.chat_template(str(good)).text == good.read_text()
    line = refusal(["serve", "--chat-template", str(bad)])
    assert f"argument --chat-template: '{bad}'" in line, line


# --- one server: JSON logs, the serving line after the bind, /version behind the key, the chat template --------

TEMPLATE = ("{% for m in messages %}[[{{ m.role }}]] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[[assistant]] {% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    template = tmp_path_factory.mktemp("tmpl") / "chat.jinja"
    template.write_text(TEMPLATE)
    s = ServerProcess("--log-format", "json", "--api-key", "k1", "--chat-template", str(template), "--port", "0")
    try:
        s.start()  # --port 0 after the helper's own --port: the OS picks, and the serving line must name it
        line = wait_until(lambda: re.search(r'"serving on http://127\.0\.0\.1:(\d+) ', s.output())
                          or s.proc.poll() is not None, timeout=120)
        assert line and line is not True, s.output()
        s.port = int(line.group(1))
        with socket.create_connection(("127.0.0.1", s.port), timeout=5):
            pass  # listening the moment the line is out: no retry, no wait
        s.wait_ready(60)
        yield s
    finally:
        s.stop()
        s.close()


AUTH = {"Authorization": "Bearer k1"}


def test_version_is_served_behind_the_key_and_in_the_contract(server):
    from api.version import version_info
    r = httpx.get(f"{server.url}/version", headers=AUTH)
    assert r.status_code == 200 and r.json() == version_info() and r.json()["version"] == "0.1.0"
    assert httpx.get(f"{server.url}/version").status_code == 401
    doc = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    assert "get" in doc["paths"]["/version"]


def test_the_chat_template_file_replaces_the_models(server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=AUTH).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, headers=AUTH).json()["prompt"]
    assert text == "[[system]] be brief\n[[user]] hello there\n[[assistant]] "
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)


def test_the_start_up_line_says_the_step_budget_auto_chose_and_why(server):
    from model_runner.precision import compute_dtype
    from model_runner.step_budget import default_max_num_batched_tokens
    budget, why = default_max_num_batched_tokens("cpu", compute_dtype("auto", "cpu")[0], "none")
    assert f"max_num_batched_tokens {budget} ({why})" in server.output(), server.output()


def test_every_log_line_is_one_json_object(server):
    """Run last against the server: stops it, then reads the whole log (start-up, requests, errors, drain)."""
    sent = [httpx.get(f"{server.url}/nope", headers=AUTH),
            httpx.post(f"{server.url}/v1/completions", headers=AUTH | {"Content-Type": "application/json"},
                       content=b"{not json"),
            httpx.post(f"{server.url}/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 2})]
    assert [r.status_code for r in sent] == [404, 400, 200]
    assert server.stop() == 0
    lines = server.output().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this raises naming it
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    loggers = {r["logger"] for r in records}
    assert {"jitney", "jitney.access", "uvicorn.error"} <= loggers, loggers
    access = [r for r in records if r["logger"] == "jitney.access"]
    assert {(r["method"], r["path"], r["status"]) for r in access} >= {
        ("GET", "/nope", 404), ("POST", "/v1/completions", 400), ("POST", "/v1/completions", 200)}
    done = next(r for r in access if r["status"] == 200 and r["path"] == "/v1/completions")
    assert done["prompt_tokens"] >= 1 and done["completion_tokens"] == 2 and done["duration_ms"] >= 0
    assert any(r["message"].startswith("serving on ") for r in records)
