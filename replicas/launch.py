"""`jitney serve --replicas N` / `--ray-address ADDR`: Ray Serve replicas behind the usual HTTP front end.

This process runs the same Starlette app and uvicorn server as the single-process path, over a RemoteEngine.
It starts a local Ray instance (a small object store: only requests and tokens travel through it; no dashboard)
or joins a cluster, deploys N JitneyReplica replicas (one engine each, `cpus_per_replica` cores each), and on
exit, after the drain, deletes them (and stops the Ray it started).
"""
from __future__ import annotations

import logging
import os

from api.app import ServerSettings, build_app
from api.protocol import ConnectionLimits
from api.server import serve
from batcher.config import BatcherConfig
from model_runner.config import RunnerConfig
from model_runner.errors import InvalidRequestError

from . import metrics as replica_metrics

APP = "jitney"
OBJECT_STORE_BYTES = 128 << 20   # Ray's floor is 75 MiB; requests and token batches are a few KiB each
STATS_PERIOD_S = 1.0             # how often each replica reports its load and cached blocks to the router
log = logging.getLogger("jitney.replicas")


def cpus_per_replica(replicas: int, asked: int | None) -> int:
    return asked or max(1, (os.cpu_count() or 1) // replicas)


def deploy(replicas: int, cpus: int, runner_cfg: RunnerConfig, batcher_cfg: BatcherConfig, routing: str,
           imbalance: float, grace_s: float, log_requests: bool = False):
    """Deploys the replicas on the Ray instance this process is connected to; returns the Serve handle."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .deployment import JitneyReplica

    serve.start(proxy_location="Disabled")  # our own front end takes the HTTP traffic, not Serve's proxy
    gpu = 1 if runner_cfg.device.startswith("cuda") else 0
    dep = serve.deployment(
        JitneyReplica, name="JitneyReplica", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpu},
        # Each replica bounds its own queue (429 with Retry-After, as one process does): Ray's per-replica limit
        # is set above it so that ours is the one that answers.
        max_ongoing_requests=batcher_cfg.max_queue + batcher_cfg.max_num_seqs,
        # The front end's bound: requests waiting here for a replica slot; past it, 429.
        max_queued_requests=batcher_cfg.max_queue,
        health_check_period_s=1.0, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=grace_s + 5.0,
        request_router_config=RequestRouterConfig(
            # Ray ships router.py by value; what it shares with /metrics lives in board.py (see there).
            request_router_class="replicas.router.JitneyRouter",
            request_router_kwargs={"policy": routing, "imbalance": imbalance},
            request_routing_stats_period_s=STATS_PERIOD_S, request_routing_stats_timeout_s=10.0),
        logging_config={"log_level": "WARNING", "enable_access_log": False})
    return serve.run(dep.bind(runner_cfg, batcher_cfg, cpus, log_requests), name=APP, route_prefix=None)


def serve_replicas(args, runner_cfg: RunnerConfig, batcher_cfg: BatcherConfig, settings: ServerSettings,
                   limits: ConnectionLimits) -> int:
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise InvalidRequestError("--replicas and --ray-address need Ray Serve: pip install -e '.[scale]' "
                                  "(or make install SCALE=1)") from None
    from .remote_engine import RemoteEngine

    cpus = cpus_per_replica(args.replicas, args.cpus_per_replica)
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    else:
        gpus = args.replicas if runner_cfg.device.startswith("cuda") else 0
        ray.init(num_cpus=args.replicas * cpus, num_gpus=gpus, object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, logging_level=logging.WARNING)
    try:
        handle = deploy(args.replicas, cpus, runner_cfg, batcher_cfg, args.routing, args.routing_imbalance,
                        args.grace_s, args.log_requests)
        engine = RemoteEngine(handle, handle.info.remote().result())
        app = build_app(engine, settings)
        replica_metrics.install(app.metrics if hasattr(app, "metrics") else app.app.metrics)  # under CORS or not
        scheme = "https" if args.ssl_certfile else "http"
        print(f"jitney: {engine.runner.describe()}\njitney: {args.replicas} replicas x {cpus} CPU on Ray "
              f"({args.ray_address or 'started here'}), routing {args.routing}; policy {args.policy}; "
              f"serving on {scheme}://{args.host}:{args.port}", flush=True)
        serve(app, engine, settings, args.host, args.port, args.grace_s, args.ssl_certfile, args.ssl_keyfile,
              limits, args.keep_alive_s)
    finally:
        try:
            ray_serve.delete(APP)
            if not args.ray_address:
                ray_serve.shutdown()
        finally:
            ray.shutdown()
    return 0
