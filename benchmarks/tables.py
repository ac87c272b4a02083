"""The docs' tables, written from the result files `make bench-all` leaves in results/, so that no figure is
copied by hand: every table between `<!-- table: NAME -->` and `<!-- /table -->` in docs/*.md is replaced by
NAME's rendering below. A table whose results are missing is left as it is, and named.

    python -m benchmarks.tables [--results results] [--docs docs]
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

from .micro import format_table as micro_table
from .report import digest_table, latency_table, throughput_table
from .roofline import format_report as roofline_report

MARKER = re.compile(r"(?P<open><!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(?P<close><!-- /table -->)", re.S)


def _runs(path: Path, labels: list[str] | None = None) -> list[tuple[str, dict]]:
    runs = json.loads((path / "results.json").read_text())["runs"]
    return [(labels[i] if labels else r["label"], r["summary"]) for i, r in enumerate(runs)]


def _full(folder: str) -> Callable[[Path], str]:
    return lambda results: (f"{throughput_table(_runs(results / folder))}\n\n"
                            f"{latency_table(_runs(results / folder))}")


def _digest(folder: str) -> Callable[[Path], str]:
    return lambda results: digest_table(_runs(results / folder))


def _prefix(results: Path) -> str:
    return digest_table([run for mode in ("on", "off")
                         for run in _runs(results / f"prefix-{mode}", [f"continuous, prefix cache {mode}"])])


def _micro(results: Path) -> str:
    return micro_table(json.loads((results / "micro.json").read_text())["rows"])


def _roofline(results: Path) -> str:
    return roofline_report(json.loads((results / "roofline" / "roofline.json").read_text())).split("\n\n", 1)[1]


TABLES: dict[str, Callable[[Path], str]] = {
    "micro": _micro,
    "roofline": _roofline,
    "policies": _full("readme"),
    "burst": _digest("burst"),
    "azure": _full("azure"),
    "prefix": _prefix,
    **{f"sweep-{knob}": _digest(f"sweep-{knob}")
       for knob in ("max-wait-ms", "max-batch-size", "max-num-batched-tokens", "block-size")},
}


def rewrite(text: str, results: Path, missing: set[str]) -> str:
    def table(m: re.Match) -> str:
        name = m["name"]
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}: known are {', '.join(TABLES)}")
        try:
            body = TABLES[name](results).strip() + "\n"
        except FileNotFoundError:
            missing.add(name)
            body = m["body"]
        return m["open"] + body + m["close"]
    return MARKER.sub(table, text)


def main(argv: list[str] | None = None) -> set[str]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results", help="where bench-all wrote its results (default: results)")
    p.add_argument("--docs", default="docs", help="the Markdown files to rewrite (default: docs)")
    args = p.parse_args(argv)
    missing: set[str] = set()
    for doc in sorted(Path(args.docs).glob("*.md")):
        text = doc.read_text()
        new = rewrite(text, Path(args.results), missing)
        if new != text:
            doc.write_text(new)
            print(f"rewrote the tables of {doc}")
    if missing:
        print(f"no results for {', '.join(sorted(missing))}: those tables are left as they were")
    return missing


if __name__ == "__main__":
    main()
