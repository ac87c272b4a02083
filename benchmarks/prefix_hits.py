"""The prefix cache's hit rate under memory pressure: the KV-cache manager alone, on a synthetic multi-tenant
workload, no model.

    python -m benchmarks.prefix_hits [--blocks 400,800,1600] [--tenants 8,32,128]

Each request is one of --tenants system prompts (256 tokens, tenants drawn Zipf-like: tenant i with weight
1 / (i + 1)) plus 8..64 tokens of its own, and generates 16..128 tokens, one a step; up to 16 run at once, and
a new one arrives at each step with probability 1/2. Admission looks the prompt up (find_computed_blocks), a
step grows every running sequence by one token and caches its full blocks, a sequence that finds no block is
dropped (as a preemption would free it). The figure is full prompt blocks found over those looked up, over
--seeds runs of --steps steps each. It measures which blocks eviction picks (batcher/kv_cache_manager.py): run
it at two commits to compare two allocators on the same workload.
"""
from __future__ import annotations

import argparse
import random
import time

from batcher.kv_cache_manager import KVCacheManager
from model_runner.sampling_params import SamplingParams
from model_runner.sequence import Sequence

from .report import finish

BLOCK = 16
SYSTEM_TOKENS, OWN_TOKENS, OUTPUT_TOKENS, MAX_RUNNING = 256, (8, 64), (16, 128), 16


def hit_rate(num_blocks: int, tenants: int, steps: int, seed: int) -> float:
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=True)
    systems = [[rng.randrange(1000, 2000) for _ in range(SYSTEM_TOKENS)] for _ in range(tenants)]
    weights = [1 / (i + 1) for i in range(tenants)]
    running: list[tuple[Sequence, list[int]]] = []  # (sequence, [tokens left to generate])
    found = queried = 0
    for _ in range(steps):
        if len(running) < MAX_RUNNING and rng.random() < 0.5:
            prompt = rng.choices(systems, weights)[0] + [rng.randrange(3000) for _ in range(rng.randint(*OWN_TOKENS))]
            s = Sequence(prompt, SamplingParams(max_tokens=rng.randint(*OUTPUT_TOKENS)))
            hit = kv.find_computed_blocks(s)
            if kv.allocate_slots(s, len(s) - len(hit) * BLOCK, hit):
                found, queried = found + len(hit), queried + hit.num_queried
                s.num_computed_tokens = len(s)
                kv.cache_full_blocks(s)
                running.append((s, [s.params.max_tokens]))
        for entry in list(running):
            s, left = entry
            if left[0] and kv.allocate_slots(s, 1):
                s.token_ids.append(rng.randrange(3000))
                s.num_computed_tokens += 1
                kv.cache_full_blocks(s)
                left[0] -= 1
            else:  # done, or no block left for it
                kv.free(s)
                running.remove(entry)
    return found / max(queried, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefix_hits", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="400,800,1600", help="KV cache sizes in 16-token blocks")
    p.add_argument("--tenants", default="8,32,128", help="numbers of distinct system prompts")
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--json", help="write every figure to this file")
    a = p.parse_args(argv)
    started = time.perf_counter()
    blocks, tenants = [int(x) for x in a.blocks.split(",")], [int(x) for x in a.tenants.split(",")]
    print("| KV blocks | " + " | ".join(f"{t} tenants" for t in tenants) + " |\n|---|" + "---|" * len(tenants))
    rates = {}
    for b in blocks:
        rates[b] = {t: sum(hit_rate(b, t, a.steps, s) for s in range(a.seeds)) / a.seeds for t in tenants}
        print(f"| {b} | " + " | ".join(f"{100 * r:.1f} %" for r in rates[b].values()) + " |", flush=True)
    return finish({"hit_rate": rates}, a.json, started)


if __name__ == "__main__":
    main()
