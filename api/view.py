"""`jitney view FILE [FILE2]`: the dashboard page (api/static/dashboard.html) over step recordings, with play/pause,
seek and speed; two recordings side by side.

A recording is the JSONL that `jitney bench --record-steps FILE` or `jitney simulate --record-steps FILE` writes
(one writer, batcher/step_view.StepRecorder; a simulated run's times are simulated seconds): per run a hello line
(its label), then the run's step events (the schema of batcher/step_view.py). A file holding several runs (bench over several policies)
shows its first two side by side; with FILE2, the first run of each file. Served on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model_runner.errors import InvalidRequestError

from .flags import integer


def add_view_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="a recording from `jitney bench --record-steps FILE` or `jitney simulate --record-steps FILE`; "
                        "give two to compare them side by side (e.g. static and continuous on the same trace)")
    p.add_argument("--port", type=integer(0, 65535), default=0, help="port on 127.0.0.1 (default: 0 = a free one the OS picks)")


def read_runs(path: str) -> list[tuple[str, list[str]]]:
    """(label, its JSONL lines) of each run in a recording; raises InvalidRequestError on a file that is none."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {path}: {e.strerror or e}") from None
    out: list[tuple[str, list[str]]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            kind = event["type"]
        except (ValueError, KeyError, TypeError):
            raise InvalidRequestError(f"{path}:{i} is not a step event (a recording from `jitney bench "
                                      f"--record-steps` or `jitney simulate --record-steps`)") from None
        if kind == "hello":
            out.append((event.get("label") or f"{Path(path).name} run {len(out) + 1}", []))
        elif not out:
            raise InvalidRequestError(f"{path}:{i}: a recording starts with a hello event")
        out[-1][1].append(line)
    if not out:
        raise InvalidRequestError(f"{path} holds no recorded run")
    return out


def panes(files: list[str]) -> list[tuple[str, list[str]]]:
    if len(files) > 2:
        raise InvalidRequestError("jitney view shows one or two recordings (FILE [FILE2])")
    if len(files) == 2:
        shown = [read_runs(files[0])[0], read_runs(files[1])[0]]
        if shown[0][0] == shown[1][0]:  # two runs of one policy (prefix caching on and off): say which file
            shown = [(f"{label} ({Path(f).name})", lines) for f, (label, lines) in zip(files, shown)]
        return shown
    return read_runs(files[0])[:2]


def build_view_app(shown: list[tuple[str, list[str]]]):
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from .dashboard import page

    html = page({"mode": "replay", "recordings": [f"/recordings/{i}" for i in range(len(shown))],
                 "names": [label for label, _ in shown]})

    async def index(request):
        return Response(html, media_type="text/html; charset=utf-8", headers={"cache-control": "no-store"})

    async def recording(request):
        i = int(request.path_params["i"])
        if i >= len(shown):
            return Response("no such recording", status_code=404)
        return Response("\n".join(shown[i][1]) + "\n", media_type="application/x-ndjson")

    return Starlette(routes=[Route("/", index), Route("/dashboard", index),
                             Route("/recordings/{i:int}", recording)])


def cmd_view(args: argparse.Namespace) -> int:
    import uvicorn

    from .server import bind
    shown = panes(args.files)
    sock = bind("127.0.0.1", args.port)
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them: the URL works once printed
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    print(f"jitney view: {' | '.join(label for label, _ in shown)}\njitney view: open {url} (Ctrl-C to stop)",
          flush=True)
    config = uvicorn.Config(build_view_app(shown), log_level="warning", lifespan="off", log_config=None)
    uvicorn.Server(config).run(sockets=[sock])
    return 0

