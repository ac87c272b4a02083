"""One replica: one jitney Engine inside a Ray Serve deployment.

It does what the single process does below the HTTP layer: validates, queues (its own bounded queue: a full
one answers "overloaded" with a retry hint), batches and streams. The front end (remote_engine.py) calls
generate() through a Serve handle, so the request router (router.py) picks the replica; the first item of every
stream says whether the replica took the request (and which replica it is) or why not. Cancelling the stream
(the client left, or a drain) aborts the request here within a step.

Ray Serve also calls two methods of ours on its own schedule: check_health() (an engine whose loop died is
reported unhealthy, and Ray replaces the replica) and record_routing_stats() (load, KV usage, the hashes of
the cached blocks, and the counters /metrics merges; the router reads them).
"""
from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import asdict, dataclass, replace

from api.metrics import STEP_HISTOGRAMS
from batcher.config import BatcherConfig
from batcher.engine import Engine
from batcher.engine_client import EngineStopped
from batcher.request_queue import Overloaded
from batcher.request import RequestOutput
from batcher.stats import StepRecord
from model_runner.config import RunnerConfig
from model_runner.errors import InvalidRequestError
from model_runner.grammar import GrammarError
from model_runner.runner import ModelRunner
from model_runner.sampling_params import SamplingParams


def keep_serve_grpc_on_loopback() -> bool:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0", hard-coded with no setting
    (ray/serve/_private/replica.py, _on_initialized, after our __init__). On a node Ray keeps to loopback
    (launch.LOCAL_RAY_ENV) it would be the one socket listening on every interface: bind it to loopback, the
    node's own address, which is where Serve's handles reach it. On any other node it is left as Ray makes it."""
    import ray
    from ray.serve._private import replica as serve_replica
    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return False
    original = serve_replica.add_port_to_grpc_server
    if getattr(original, "jitney_loopback", False):
        return True

    def on_loopback(server, address: str):
        return original(server, "127.0.0.1:" + address[len("[::]:"):] if address.startswith("[::]:") else address)

    on_loopback.jitney_loopback = True
    serve_replica.add_port_to_grpc_server = on_loopback
    return True


@dataclass
class Accepted:
    replica: str


@dataclass
class Refused:
    kind: str                  # invalid | invalid_schema | overloaded | stopped
    message: str
    retry_after: float = 1.0


class JitneyReplica:
    async def __init__(self, runner_cfg: RunnerConfig, batcher_cfg: BatcherConfig, threads: int,
                       log_requests: bool = False):
        from ray import serve
        keep_serve_grpc_on_loopback()
        # --threads, or this replica's share of the cores (Ray reserved num_cpus for it)
        self.runner = ModelRunner(replace(runner_cfg, threads=runner_cfg.threads or threads), progress=False)
        self.engine = Engine(self.runner, batcher_cfg, log_requests=log_requests)
        self.name = serve.get_replica_context().replica_id.unique_id
        # Per histogram: a count per bucket (the last one +Inf) and the sum of observations.
        self.histograms = {name: ([0] * (len(b) + 1), [0]) for name, (b, _) in STEP_HISTOGRAMS.items()}
        self.engine.step_observers.append(self._observe_step)
        await self.engine.warm_up()  # response_format's schemas are compiled here, on the replica that runs them
        await self.engine.start()

    def _observe_step(self, rec: StepRecord) -> None:
        for name, value in (("batch_size", rec.batch_size), ("step_tokens", rec.num_tokens)):
            (bounds, _), (counts, total) = STEP_HISTOGRAMS[name], self.histograms[name]
            counts[next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] += 1
            total[0] += value

    def info(self) -> dict:
        """What the front end needs to parse and tokenize requests without loading the model itself."""
        e = self.engine
        return {"model_info": e.model_info, "tokenizer": e.tokenizer, "config_info": e.config_info()}

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, n: int):
        """Yields Accepted or Refused, then lists of (sample index, RequestOutput): whatever is ready at once
        travels together, so a busy replica sends fewer, larger messages."""
        try:
            streams = await self.engine.add_parallel_requests(prompt_token_ids, params, n)
        except GrammarError as e:  # the response_format's schema, compiled here, cannot be enforced
            yield Refused("invalid_schema", str(e))
            return
        except InvalidRequestError as e:
            yield Refused("invalid", str(e))
            return
        except Overloaded as e:
            yield Refused("overloaded", str(e), e.retry_after)
            return
        except EngineStopped as e:
            yield Refused("stopped", str(e))
            return
        yield Accepted(self.name)
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            async for out in stream:
                queue.put_nowait((i, out))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        left = len(streams)
        try:
            while left:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                left -= sum(out.finished for _, out in batch)
                yield batch
        finally:  # the caller cancelled (client gone, drain): free the KV blocks at the next step
            for t in tasks:
                t.cancel()
            for s in streams:
                s.abort()

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError(f"replica {self.name}: the engine loop is not running")

    def record_routing_stats(self) -> dict:
        snap = self.engine.replica_snapshot()
        s = snap["stats"]
        return {"replica": self.name, "pid": os.getpid(), "node": socket.gethostname(),
                "block_size": self.engine.model_info.block_size,
                "load": s.waiting + s.running, "kv_usage": s.kv_blocks_used / max(s.kv_blocks_total, 1),
                "stats": asdict(s),
                "cached_block_hashes": snap["cached_block_hashes"],
                "histograms": {name: (list(c), t[0]) for name, (c, t) in self.histograms.items()}}

    async def __del__(self) -> None:
        """Serve calls this when it deletes the replica, after its own wait for requests in flight (the front end
        drained them first): end the engine loop and its thread."""
        if hasattr(self, "engine"):  # not when __init__ failed
            await self.engine.stop()
