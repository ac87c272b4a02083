"""`jitney serve --replicas N` / `--ray-address ADDR`: Ray Serve replicas behind the usual HTTP front end.

This process runs the same Starlette app and uvicorn server as the single-process path, over a RemoteEngine.
It starts a local Ray instance (a small object store: only requests and tokens travel through it; no dashboard
UI; every process of it listening on loopback only, see LOCAL_RAY_ENV) or joins a cluster, deploys N
JitneyReplica replicas (one engine each, `cpus_per_replica` cores each, a KV budget sized to the host's memory:
memory.py), and on exit, after the drain, deletes them (and stops the Ray it started).
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace

from api import logs
from api.app import ServerSettings, build_app
from api.protocol import ConnectionLimits
from api.server import serve
from batcher.config import BatcherConfig
from model_runner import threads
from model_runner.config import RunnerConfig
from model_runner.errors import InvalidRequestError

from . import memory
from . import metrics as replica_metrics

APP = "jitney"
OBJECT_STORE_BYTES = 128 << 20   # Ray's floor is 75 MiB; requests and token batches are a few KiB each
STATS_PERIOD_S = 1.0             # how often each replica reports its load and cached blocks to the router
log = logging.getLogger("jitney.replicas")
# Set before Ray is imported, for a Ray started here (its processes inherit them):
#  - Ray binds its gRPC servers (GCS, raylet, every worker), its agents and its metrics servers to all
#    interfaces unless the node's address is loopback, and ray.init turns a loopback _node_ip_address into the
#    machine's address (services.resolve_ip_for_localhost). It keeps loopback only where clusters are off
#    (ray_constants.ENABLE_RAY_CLUSTER, this variable; Ray's default on Windows and macOS), so a local Ray
#    listens on 127.0.0.1 and nothing else: tests/test_replicas.py lists every socket of the process tree.
#  - no usage report is sent (ray's --disable-usage-stats).
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# The lines replica processes write reach this process's output (Ray's log_to_driver), prefixed with the
# process's name and pid: without ANSI colour in it (RAY_COLOR_PREFIX=0), so a log file or a shipper gets
# plain text. Set for a joined cluster too: it is read here, by this process's printing of them.
LOG_ENV = {"RAY_COLOR_PREFIX": "0"}


def cpus_per_replica(replicas: int, asked: int | None) -> int:
    return asked or max(1, threads.available() // replicas)


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


def size_replicas(args, runner_cfg: RunnerConfig) -> tuple[RunnerConfig, str]:
    """Each replica's KV budget (memory.py) and how it was chosen; only a local Ray on the CPU shares this host."""
    if args.ray_address or runner_cfg.device != "cpu":
        if runner_cfg.kv_cache_memory is not None:
            return runner_cfg, f"--kv-cache-memory {runner_cfg.kv_cache_memory / 2**30:.2f} GiB each"
        return runner_cfg, ("KV cache: each replica's own default (on a cluster, this host cannot see the "
                            "replicas' memory)")
    from model_runner.kv_cache import DEFAULT_CPU_KV_BYTES
    weights, context = memory.model_bytes(runner_cfg)
    available, total = memory.host_memory_now()
    plan = memory.plan_kv(args.replicas, available, total, weights, context, runner_cfg.kv_cache_memory,
                          DEFAULT_CPU_KV_BYTES, memory.threshold())
    return replace(runner_cfg, kv_cache_memory=plan.kv_bytes), plan.note


def ray_reach(ray_address: str | None) -> str:
    """What Ray's processes listen on, as the node's address says (LOCAL_RAY_ENV for a Ray started here)."""
    import ipaddress

    import ray
    ip = ray.util.get_node_ip_address()
    if not ray_address:
        if ipaddress.ip_address(ip).is_loopback:
            return f"Ray started here, every process of it listening on loopback only ({ip})"
        return (f"Ray started here on {ip}: Ray did not keep to loopback, so its processes listen on every "
                f"interface (docs/replicas.md)")
    return (f"Ray: the cluster at {ray_address}, joined as node address {ip}; its processes listen as that "
            f"cluster was started, on every interface unless it was kept to loopback (docs/replicas.md)")


def forward_replica_logs_as_records() -> None:
    """Under --log-format json: each line a Ray process writes becomes a log record (logger "ray.worker", its
    pid and actor as fields) instead of Ray's prefixed text line, and Ray's own loggers in this process write
    through the one handler api/logs.py set. Ray's printing is swapped on its stdstream dispatcher, the hook its
    own ray.init installs it on (ray/_private/worker.py, Ray 2.60)."""
    from ray._private import ray_constants
    from ray._private.worker import filter_autoscaler_events
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    worker_log = logging.getLogger("ray.worker")
    worker_log.setLevel(logging.INFO)  # under "ray", which ray.init holds at WARNING: these lines are all kept
    marker = ray_constants.LOG_PREFIX_INFO_MESSAGE

    def emit(data: dict) -> None:
        # As Ray's print_worker_logs: of the autoscaler's output only its events (not its periodic status).
        lines = data.get("lines", ())
        if data.get("pid") == "autoscaler":
            lines = filter_autoscaler_events(lines)
        fields = {"pid": data.get("pid"), "actor": data.get("actor_name") or data.get("task_name") or None,
                  "stream": "stderr" if data.get("is_err") else "stdout"}
        for line in lines:
            worker_log.info(line.split(marker)[1] if marker in line else line, extra=fields)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", emit)
    logs.adopt("ray", "ray.serve")


def serve_replicas(args, runner_cfg: RunnerConfig, batcher_cfg: BatcherConfig, settings: ServerSettings,
                   limits: ConnectionLimits, guards: str, sock) -> int:
    """guards: the start-up lines of the HTTP front end's protections (jitney/cli.py's protections()), printed
    once the front end listens on sock (bound by jitney/cli.py before anything else starts)."""
    os.environ.update(LOG_ENV)
    if not args.ray_address:
        os.environ.update(LOCAL_RAY_ENV)
    try:
        import ray
        from ray import serve as ray_serve
    except ImportError:
        raise InvalidRequestError("--replicas and --ray-address need Ray Serve: pip install -e '.[scale]' "
                                  "(or make install SCALE=1)") from None
    from .remote_engine import RemoteEngine
    if args.log_format == "json":  # Ray's own handlers, set as it was imported: its first warnings come in ray.init
        logs.adopt("ray", "ray.serve")

    cpus = cpus_per_replica(args.replicas, args.cpus_per_replica)
    runner_cfg, kv_note = size_replicas(args, runner_cfg)  # before Ray starts: a refusal costs nothing
    if args.ray_address:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    else:
        gpus = args.replicas if runner_cfg.device.startswith("cuda") else 0
        ray.init(num_cpus=args.replicas * cpus, num_gpus=gpus, object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, logging_level=logging.WARNING)
    if args.log_format == "json":
        forward_replica_logs_as_records()
    try:
        handle = deploy(args.replicas, cpus, runner_cfg, batcher_cfg, args.routing, args.routing_imbalance,
                        args.grace_s, args.log_requests)
        engine = RemoteEngine(handle, handle.info.remote().result())
        if args.chat_template is not None:  # chat is rendered here, in the front end, with this tokenizer
            engine.tokenizer.chat_template = args.chat_template.text
        app = build_app(engine, settings)
        replica_metrics.install(app.metrics)
        logs.log_line(f"jitney: {engine.model_info.description}\njitney: {args.replicas} replicas x {cpus} CPU, "
                      f"{kv_note}; routing {args.routing}; policy {args.policy}\njitney: {ray_reach(args.ray_address)}")
        serve(app, engine, settings, sock, args.grace_s, args.ssl_certfile, args.ssl_keyfile, limits,
              args.keep_alive_s, ready=guards)
    finally:
        try:
            ray_serve.delete(APP)  # the replicas drain and stop; on a joined cluster the rest of Serve stays
        finally:
            # A local Ray goes whole (Serve's controller with it): serve.shutdown() first would ray.kill the
            # controller under this process's own pending calls to it, which the raylet then reports as failed
            # tasks ("The actor is dead because it was killed by `ray.kill`") at every clean exit.
            ray.shutdown()
    return 0
