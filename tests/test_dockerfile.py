"""The Dockerfile, checked without Docker (this workplace has no engine and cannot reach Docker Hub): every path it
copies exists in the repository, it installs the way the Makefile does, and it runs the README's two commands."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.splitlines() if not l.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_every_copied_path_exists():
    copies = [args for op, args in instructions() if op in ("COPY", "ADD")]
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert not src.startswith("--"), f"COPY flag not understood by this check: {src}"
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"


def test_packages_the_makefile_installs_are_copied():
    """pyproject's packages are what `pip install -e .` needs; each must be copied in."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r'packages = \[(.*?)\]', pyproject)[1]
    copied = {shlex.split(a)[0].rstrip("/") for op, a in instructions() if op == "COPY"}
    for pkg in re.findall(r'"(\w+)"', packages):
        assert pkg in copied, f"package {pkg} is not copied into the image"


def test_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    runs = " ".join(a for op, a in instructions() if op == "RUN")
    assert re.search(r"\bmake test\b", runs), "the image does not run the suite"
    cmd = [a for op, a in instructions() if op == "CMD"]
    assert len(cmd) == 1 and '"make", "serve"' in cmd[0]


def test_cpu_torch_of_the_pinned_version():
    """A bare torch from PyPI is a multi-GB CUDA build: the image must take the Makefile's pin, as a CPU build."""
    pin = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    assert pin.startswith("torch==")
    assert f"TORCH={pin}+cpu" in DOCKERFILE
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE


def test_base_image_python_satisfies_requires_python():
    base = next(a for op, a in instructions() if op == "FROM")
    major, minor = map(int, re.search(r"python:(\d+)\.(\d+)", base).groups())
    need = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert (major, minor) >= (int(need[1]), int(need[2]))


def test_exposed_port_is_the_served_port():
    exposed = [a for op, a in instructions() if op == "EXPOSE"]
    cmd = next(a for op, a in instructions() if op == "CMD")
    port = re.search(r"--port (\d+)", cmd)[1]
    assert exposed == [port]
