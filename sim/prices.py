"""What a device costs per hour, for `jitney plan`: a default table, and `--price DEVICE=USD` over it.

The defaults are on-demand list prices per GPU-hour, from AWS EC2 (US East, N. Virginia, Linux): the price of
the instance that carries the GPU divided by its GPUs, so each includes its share of that instance's CPUs,
memory and network. They are the long-standing list prices (2023-2024) as quoted on AWS's EC2 on-demand pricing
page; AWS announced cuts of up to 45 % to its P4 and P5 prices in June 2025, other clouds and reserved or spot
capacity differ by 2-4x, and prices move: they are an example to replace with your own (--price), not a quote.
"""
from __future__ import annotations

import argparse

from .hardware import DEVICES

# device: (USD per GPU-hour, where the figure comes from)
PRICES: dict[str, tuple[float, str]] = {
    "a100-40gb": (32.7726 / 8, "AWS p4d.24xlarge, 8x A100 40 GB, $32.77/h"),
    "a100-80gb": (40.9657 / 8, "AWS p4de.24xlarge, 8x A100 80 GB, $40.97/h"),
    "h100-sxm": (98.32 / 8, "AWS p5.48xlarge, 8x H100 SXM, $98.32/h"),
    # AWS lists no long-standing on-demand price for its H200 instance (p5e, first sold as Capacity Blocks):
    # the H100's price x 1.1, the ratio of AWS's Capacity Block rates per GPU-hour ($5.408 H200, $4.916 H100,
    # late 2024).
    "h200": (98.32 / 8 * 1.1, "AWS p5.48xlarge's H100 price x 1.1 (the H200/H100 Capacity Block ratio)"),
    "l4": (0.8048, "AWS g6.xlarge, 1x L4, $0.8048/h"),
    "a10g": (1.006, "AWS g5.xlarge, 1x A10G, $1.006/h"),
}
assert set(PRICES) == set(DEVICES), "every device on the hardware sheet needs a default price"


def price_flag(s: str) -> tuple[str, float]:
    """--price DEVICE=USD (per device-hour)."""
    name, _, usd = s.partition("=")
    try:
        value = float(usd)
    except ValueError:
        value = -1.0
    if name not in DEVICES or not value > 0:
        raise argparse.ArgumentTypeError(f"want DEVICE=USD per hour with DEVICE one of {', '.join(DEVICES)} and "
                                         f"USD > 0, e.g. a100-80gb=3.67; got {s!r}")
    return name, value


def prices(overrides: list[tuple[str, float]] | None) -> dict[str, tuple[float, str]]:
    """The table with the overrides given on the command line (the last one for a device wins)."""
    table = dict(PRICES)
    for name, usd in overrides or []:
        table[name] = (usd, "--price")
    return table
