"""GET /version: the installed package's version, and the commit when the code runs from a git checkout.

As vLLM's /version ({"version": ...}). The commit is read from .git's files (no git binary needed, nothing run);
an installed copy without .git (a wheel, the container image) answers the version alone.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_version() -> str:
    try:
        return metadata.version("jitney")
    except metadata.PackageNotFoundError:  # run from a source tree never installed
        return "unknown"


def git_commit(repo: Path = REPO) -> str | None:
    """HEAD's commit: a detached HEAD holds it, a branch names a ref in refs/ or in packed-refs."""
    try:
        head = (repo / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head if len(head) == 40 else None
        ref = head[5:]
        loose = repo / ".git" / ref
        if loose.exists():
            return loose.read_text().strip()
        for line in (repo / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:  # no .git (an installed copy), or a worktree's .git file
        return None
    return None


def version_info() -> dict:
    commit = git_commit()
    return {"version": package_version(), **({"commit": commit} if commit else {})}
