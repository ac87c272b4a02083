"""Sizes as people write them ('2GiB', '512MiB'): the server's and the benchmarks' byte flags share this."""
from __future__ import annotations

import argparse


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    t = text.strip().lower().removesuffix("b")
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * units[suffix])
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 2GiB, 512MiB or a byte count)") from None
