"""Running a real `jitney serve` in a subprocess for HTTP tests: free port, wait for /health, always stop it.

    with jitney_server("--dtype", "float32") as server:
        httpx.get(f"{server.url}/health")

The server binds 127.0.0.1 only. Its stdout and stderr go to one log file (server.output() reads it), so a test
can check what was logged, and a server that fails to start is reported with its own output. start() and
wait_ready() are separate, so a test can start several servers (or load a model in-process) while one boots.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it; there is a small race until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `jitney serve` subprocess. args are extra CLI flags; --model, --host and --port are added here."""

    def __init__(self, *args: str, model: str = "tiny-random", grace_s: float | None = 2.0,
                 env: dict[str, str] | None = None, https: bool = False):
        self.args, self.model, self.https = list(args), model, https
        if grace_s is not None and "--grace-s" not in self.args:  # a stuck test must not hold teardown for 30 s
            self.args += ["--grace-s", str(grace_s)]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("JITNEY_API_KEY", None)  # keys come from --api-key only, whatever the caller's shell has
        self.env.setdefault("JITNEY_CACHE_DIR", "/tmp/jcache")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._logdir = tempfile.TemporaryDirectory(prefix="jitney-server-")
        self.log_path = Path(self._logdir.name) / "server.log"
        self._log = None

    @property
    def url(self) -> str:
        return f"{'https' if self.https else 'http'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "ServerProcess":
        self.port = free_port()
        cmd = [sys.executable, "-m", "jitney.cli", "serve", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60.0) -> "ServerProcess":
        """Polls GET /health until 200; raises with the server's output if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        with httpx.Client(verify=False, timeout=2.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise RuntimeError(f"jitney serve exited with {code} before it was ready:\n{self.output()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"jitney serve was not ready within {timeout:.0f}s:\n{self.output()}")
                time.sleep(0.1)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (the server drains), wait, then SIGKILL. Returns the exit code. Safe to call twice."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._logdir.cleanup()


@contextlib.contextmanager
def jitney_server(*args: str, timeout: float = 60.0, **kw) -> Iterator[ServerProcess]:
    """A started, healthy server; stopped (and its log removed) on exit, whatever happened inside."""
    server = ServerProcess(*args, **kw)
    try:
        for attempt in range(3):  # the free port may be taken between free_port() and the server's bind
            server.start()
            try:
                server.wait_ready(timeout)
                break
            except RuntimeError:
                if attempt == 2 or "address already in use" not in server.output().lower():
                    raise
                server.stop()
        yield server
    finally:
        server.close()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.05):
    """Polls predicate() until it returns something truthy (returned) or the timeout passes (returns the last)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted label pairs): value}, model_name left out once checked on every
    sample (so each test that reads /metrics checks it too)."""
    from api.metrics import parse
    return parse(text)


def sse_events(lines) -> list:
    """The JSON payloads of `data: ...` lines (up to [DONE], which is left out) from an iterable of lines."""
    import json
    events = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "" or line.startswith(":"), f"not an SSE line: {line!r}"
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            events.append("[DONE]")
            break
        events.append(json.loads(data))
    return events
