"""Every command README.md and docs/*.md print runs as printed, from a fresh clone after `make install`.

Each shell line in a fenced block (sh, bash, shell, console or untagged) and each inline code span is split as
the shell would (shlex, comments dropped, `\\` continuations joined, leading VAR=value, `env ...`, `flock -x
FILE` and `/usr/bin/time -f FMT` stripped). Then:
- `python`, `jitney` and `pip` run from the venv, spelled `.venv/bin/...` (only that Python has torch);
- `.venv/bin/python -m MODULE` names a module that exists, and every `--flag` is one its `--help` lists;
- `.venv/bin/jitney SUB` names a subcommand, every `--flag` one of its parser's (`jitney bench routing`: that
  module's);
- `make TARGET` names a Makefile target, `bash FILE` an existing file.
Nothing is run but `--help` (the benchmarks themselves take minutes).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from .server_helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}
JITNEY_SUBCOMMANDS = ("generate", "serve", "bench", "simulate", "plan", "view")


def shell_snippets(text: str) -> list[tuple[int, str]]:
    """(line number, command text) of every fenced shell line and every inline code span."""
    out, pos = [], 0
    for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M):
        out += spans(text, pos, m.start())
        if m.group(1).strip() in SHELL_FENCES:
            start = text.count("\n", 0, m.start(2)) + 1
            joined = re.sub(r"\\\n", " ", m.group(2))  # continuation lines: one command
            lines = m.group(2).split("\n")
            n = start
            for cmd in joined.split("\n"):
                out.append((n, cmd))
                n += 1
                while n - start < len(lines) and lines[n - start - 1].endswith("\\"):
                    n += 1
        pos = m.end()
    return out + spans(text, pos, len(text))


def spans(text: str, start: int, end: int) -> list[tuple[int, str]]:
    """Inline code spans of text[start:end] (one may wrap a line), with their line numbers."""
    return [(text.count("\n", 0, start + m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text[start:end])]


def words(cmd: str) -> list[str]:
    """The command's words, its environment and wrappers stripped; [] for what is not a shell command."""
    try:
        w = shlex.split(cmd, comments=True)
    except ValueError:  # not shell (a JSON fragment, a Python expression)
        return []
    while w:
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w[0]) or w[0].startswith("$"):
            w = w[1:]
        elif w[0] == "env":
            w = w[1:]
        elif w[0] == "flock" and len(w) > 2:
            w = w[3:]
        elif w[0] == "/usr/bin/time" and len(w) > 2 and w[1] == "-f":
            w = w[3:]
        else:
            break
    return w


def invocations() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line, cmd in shell_snippets(path.read_text()):
            w = words(cmd)
            if w and (w[0] in ("python", "python3", "jitney", "pip", "make", "bash")
                      or w[0].startswith(".venv/bin/")):
                found.append((f"{path.relative_to(REPO)}:{line}: {cmd}", w))
    return found


@functools.cache
def module_flags(module: str) -> frozenset[str]:
    """The flags `python -m MODULE --help` lists: the module run as __main__ in this process (its imports are
    mostly loaded already; --help exits before any work), its help text read."""
    if module.startswith("tests."):  # pytest's assertion rewriter owns these imports: a process of its own
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, f"python -m {module} --help failed: {r.stderr[-500:]}"
        return frozenset(re.findall(r"(?<![\w-])(--[a-z0-9][\w-]*)", r.stdout))
    out, argv = io.StringIO(), sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv
    assert e.value.code in (0, None), f"python -m {module} --help failed: {e.value}"
    return frozenset(re.findall(r"(?<![\w-])(--[a-z0-9][\w-]*)", out.getvalue()))


@functools.cache
def jitney_flags(sub: str) -> frozenset[str]:
    import argparse

    if sub == "bench":
        from benchmarks.bench import build_parser
        parser = build_parser()
    elif sub == "simulate":
        from sim.simulate import build_parser
        parser = build_parser()
    elif sub == "plan":
        from sim.plan import build_parser
        parser = build_parser()
    elif sub == "view":
        from api.view import add_view_args
        parser = argparse.ArgumentParser(prog="jitney view")
        add_view_args(parser)
    else:
        try:  # the CLI may live in the top-level jitney package (it is moving there from api/)
            from jitney.cli import build_parser
        except ImportError:
            from jitney.cli import build_parser
        sp = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        parser = sp.choices[sub]
    return frozenset(o for a in parser._actions for o in a.option_strings)


def flags_of(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--") and a != "--"]


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))


INVOCATIONS = invocations()


def test_the_docs_have_commands():
    """The extraction itself: the README's two commands and its generate example are among those found."""
    said = [w for _, w in INVOCATIONS]
    assert ["make", "serve"] in said and ["make", "test"] in said
    assert any(w[:2] == [".venv/bin/jitney", "generate"] for w in said) and len(said) > 30


@pytest.mark.parametrize("where,w", INVOCATIONS, ids=[where.split(": ")[0] for where, _ in INVOCATIONS])
def test_command_runs_as_printed(where, w):
    head = w[0]
    if head in ("python", "python3", "jitney", "pip"):
        if len(w) == 1 or (head == "jitney" and w[1] not in JITNEY_SUBCOMMANDS):
            return  # the name alone, in prose (`the jitney CLI`, `jitney bench: error:`), not a command
        pytest.fail(f"{where}: only the venv has torch: say .venv/bin/{head}")
    if head == "make":
        assert w[1] in make_targets(), f"{where}: no Makefile target {w[1]!r}"
    elif head == "bash":
        assert (REPO / w[1]).is_file(), f"{where}: no such script {w[1]}"
    elif head == ".venv/bin/python":
        assert w[1] == "-m" and len(w) > 2, f"{where}: run modules with -m from the repository root"
        assert importlib.util.find_spec(w[2]) is not None, f"{where}: no module {w[2]}"
        unknown = set(flags_of(w[3:])) - module_flags(w[2])
        assert not unknown, f"{where}: {w[2]} has no {', '.join(sorted(unknown))}"
    elif head == ".venv/bin/jitney":
        assert len(w) > 1 and w[1] in JITNEY_SUBCOMMANDS, f"{where}: jitney has no subcommand {w[1:2]}"
        if w[1] == "bench" and w[2:3] == ["routing"]:
            known, rest = module_flags("benchmarks.routing"), w[3:]
        else:
            known, rest = jitney_flags(w[1]), w[2:]
        unknown = set(flags_of(rest)) - known
        assert not unknown, f"{where}: jitney {w[1]} has no {', '.join(sorted(unknown))}"
    elif head == ".venv/bin/pip":
        assert w[1] == "install"
    else:
        assert (REPO / head).exists(), f"{where}: no {head}"
