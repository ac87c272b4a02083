"""A multi-tenant shared-prefix workload: many users behind a few system prompts.

`tenants` system prompts of `system_tokens` tokens each; every request picks a tenant at random (uniformly)
and adds its own short question (`question_tokens`, different for every request), then asks for
`output_tokens` tokens (ignore_eos, so the length is exact). Arrivals are Poisson at `rate` per second.
Only the system prompt's full KV blocks can be shared: a server keeps them if its prefix cache holds them and
the request lands where they are. The prompts are token ids made up front (benchmarks.trace's word ids), so
lengths are exact and tokenizing never delays a send.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .trace import TraceRequest, arrival_times, synth_prompt_ids


@dataclass
class SharedPrefixWorkload:
    num_requests: int = 192
    rate: float = 4.0            # requests per second, Poisson
    tenants: int = 16
    system_tokens: int = 256
    question_tokens: int = 24
    output_tokens: int = 32
    seed: int = 0

    def build(self, tokenizer) -> tuple[list[TraceRequest], list[list[int]], list[int]]:
        """(trace, prompt ids per request, tenant per request)."""
        rng = random.Random(f"tenants:{self.seed}")
        systems = [synth_prompt_ids(tokenizer, self.system_tokens, f"system:{self.seed}:{t}")
                   for t in range(self.tenants)]
        times = arrival_times(self.num_requests, self.rate, "poisson", seed=self.seed)
        trace, ids, tenant_of = [], [], []
        for i, t in enumerate(times):
            tenant = rng.randrange(self.tenants)
            prompt = systems[tenant] + synth_prompt_ids(tokenizer, self.question_tokens, f"q:{self.seed}:{i}")
            trace.append(TraceRequest(t, len(prompt), self.output_tokens))
            ids.append(prompt)
            tenant_of.append(tenant)
        return trace, ids, tenant_of
