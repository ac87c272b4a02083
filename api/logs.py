"""The server's log lines: one handler on the root logger, text (the default) or one JSON object per line.

Every logger of the process ends there: jitney's own, uvicorn's ("uvicorn.error"; uvicorn is given no logging
config of its own, api/server.py, so its loggers propagate here instead of to its coloured handlers), and the
libraries'. JSON lines carry ts (ISO 8601, UTC), level, logger, message, the traceback as `exc_info` when
there is one, and any fields the call passed with `extra=` (the access log's client, method, path, status,
duration_ms, prompt_tokens, completion_tokens): what log shippers (Loki, Elasticsearch, CloudWatch) index
without a parsing rule.

Lines jitney prints with print() (the start-up lines, "serving on") are written through log_line() instead,
so that under --log-format json they too are JSON.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A LogRecord's own attributes; whatever else it carries came from `extra=` and is written as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line and not key.startswith("_"):  # Ray's _ray_timestamp_ns
                line[key] = value
        return json.dumps(line, default=str)  # default=str: an extra field JSON cannot hold is still written


_format = "text"


def setup(fmt: str = "text", level: int = logging.INFO) -> None:
    """Routes every logger to one stderr handler in `fmt` (replacing any handler set before)."""
    global _format
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    adopt("uvicorn", "uvicorn.error", "uvicorn.access")  # set up by an earlier uvicorn in this process


def adopt(*names: str) -> None:
    """Loggers a library gave handlers of its own (Ray's) write through the root's handler instead."""
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def log_line(text: str) -> None:
    """A start-up line: printed to stdout as ever in text, a JSON log record (logger "jitney") in json."""
    if _format == "json":
        log = logging.getLogger("jitney")
        for line in text.splitlines():
            log.info(line.removeprefix("jitney: "))
    else:
        print(text, flush=True)
