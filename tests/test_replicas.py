"""Replicas on Ray Serve (replicas/): `jitney serve --replicas 2` over HTTP, on tiny-random.

One Ray instance for the module (started here; the server joins it with --ray-address, as a node of a real
cluster would), one 2-replica server (1 CPU each) for every HTTP test, and one single-process server to compare
greedy text with. The tests run in file order and the last one drains the replica server with SIGTERM.
Waits are bounded polls (replicas report every second), never timed asserts.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import given, settings, strategies as st

from batcher.engine_client import ModelInfo
from batcher.request import EndReason
from model_runner.errors import InvalidRequestError
from model_runner.sampling_params import SamplingParams
from replicas import memory
from replicas.policy import Candidate, decide, leading_matches
from tests.server_helpers import REPO, ServerProcess, jitney_server, parse_metrics, sse_events, wait_until

# --- the decision alone (no Ray) -------------------------------------------------------------------------------


def test_prefix_goes_to_the_longest_match_unless_that_replica_is_overloaded():
    cands = [Candidate("a", load=3, kv_usage=0.0, matched=5), Candidate("b", load=0, kv_usage=0.0, matched=2),
             Candidate("c", load=1, kv_usage=0.0, matched=0)]
    d = decide("prefix", cands, imbalance=4, rng=random.Random(0))
    assert (d.order[0], d.kind, d.matched_blocks) == ("a", "prefix_hit", 5)
    # a is now 5 above the least loaded (b): too busy; b, the next match, is tested on its own and wins.
    cands[0].load = 5
    d = decide("prefix", cands, imbalance=4, rng=random.Random(0))
    assert (d.order[0], d.kind, d.matched_blocks) == ("b", "prefix_hit", 2)
    # A full KV cache weighs as much as `imbalance` requests.
    cands[0].load, cands[0].kv_usage = 0, 1.0
    assert decide("prefix", cands, imbalance=4, rng=random.Random(0)).order[0] == "a"
    cands[0].load = 1
    assert decide("prefix", cands, imbalance=4, rng=random.Random(0)).order[0] == "b"


def test_prefix_falls_back_to_p2c_only_when_every_match_is_overloaded():
    cands = [Candidate("a", 9, 0.0, 3), Candidate("b", 0, 0.0, 0), Candidate("c", 0, 0.0, 0)]
    d = decide("prefix", cands, imbalance=4, rng=random.Random(1))
    assert d.kind == "prefix_spill" and d.order[0] in ("b", "c") and sorted(d.order) == ["a", "b", "c"]
    cands[0].matched = 0
    assert decide("prefix", cands, imbalance=4, rng=random.Random(1)).kind == "prefix_miss"


def test_p2c_round_robin_and_chain_matching():
    cands = [Candidate("a", 5, 0.0), Candidate("b", 1, 0.0)]
    assert decide("p2c", cands, rng=random.Random(2)).order == ["b", "a"]  # two of two: the lighter first
    assert [decide("round-robin", cands, turn=t).order[0] for t in range(4)] == ["a", "b", "a", "b"]
    assert leading_matches([1, 2, 3], {1, 3}) == 1  # a chain: a block after a miss is no hit
    with pytest.raises(ValueError):
        decide("random", cands)


# --- each replica's KV budget (replicas/memory.py), no Ray -----------------------------------------------------

GiB = 2**30


@settings(max_examples=500, deadline=None)
@given(replicas=st.integers(1, 64), total=st.integers(1 * GiB, 1024 * GiB), free=st.floats(0.0, 1.0),
       weights=st.integers(0, 64 * GiB), context=st.integers(1, 4 * GiB),
       asked=st.one_of(st.none(), st.integers(1, 256 * GiB)), threshold=st.floats(0.5, 1.0))
def test_replicas_kv_budget_fits_the_host_or_is_refused(replicas, total, free, weights, context, asked, threshold):
    """Whatever the host and the model: either every replica's KV cache plus its footprint fits in what Ray's
    memory monitor leaves (so the monitor has nothing to kill), each holds at least one whole context, and an
    explicit --kv-cache-memory is kept as given; or the start is refused, in one line, because nothing fits."""
    available, default = int(free * total), 2 * GiB
    usable = available - int((1 - threshold) * total)
    each = memory.footprint(weights)
    try:
        plan = memory.plan_kv(replicas, available, total, weights, context, asked, default, threshold)
    except InvalidRequestError as e:
        assert "\n" not in str(e) and "replicas" in str(e)
        assert replicas * ((asked if asked is not None else context) + each) > usable
        return
    assert replicas * (plan.kv_bytes + each) <= usable
    if asked is not None:
        assert plan.kv_bytes == asked
    else:
        assert context <= plan.kv_bytes <= max(default, context)  # the default cap yields to one whole context
        more = memory.plan_kv(replicas, available + GiB, total + GiB, weights, context, None, default, threshold)
        assert more.kv_bytes >= plan.kv_bytes  # more memory never gives a replica less
        assert f"{plan.kv_bytes / GiB:.2f} GiB each" in plan.note


def test_too_many_replicas_for_the_host_are_refused_before_ray_starts():
    """N x --kv-cache-memory past the host's memory: one line, exit 2, before any Ray process exists."""
    pytest.importorskip("ray", reason="the 'scale' extra (ray[serve]) is not installed")
    env = {**os.environ, "JITNEY_CACHE_DIR": os.environ.get("JITNEY_CACHE_DIR", "/tmp/jcache")}
    env.pop("JITNEY_API_KEY", None)
    out = subprocess.run([sys.executable, "-m", "jitney.cli", "serve", "--model", "tiny-random", "--replicas", "64",
                          "--kv-cache-memory", "1TiB"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jitney: error: 64 replicas x (--kv-cache-memory"), out.stderr


# --- RemoteEngine.abort: the reason given is the reason the client is told (no Ray) ------------------------------

class FakeGeneration:
    """A replica's stream that has accepted the request and is still generating."""

    def __init__(self):
        self.accepted, self.cancelled = False, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        from replicas.deployment import Accepted
        if not self.accepted:
            self.accepted = True
            return Accepted("replica-1")
        await asyncio.Event().wait()

    def cancel(self):
        self.cancelled = True


FAKE_INFO = {"model_info": ModelInfo("fake", 64, 10, 16, "fake"), "tokenizer": None, "config_info": {}}


class FakeHandle:
    def __init__(self):
        self.generations = []
        self.generate = SimpleNamespace(remote=self._remote)

    def options(self, stream: bool):
        return self

    def _remote(self, *args):
        self.generations.append(FakeGeneration())
        return self.generations[-1]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), reasons=st.lists(st.sampled_from(list(EndReason)), min_size=1, max_size=3),
       started=st.booleans(), stop_after=st.booleans())
def test_remote_abort_ends_every_sample_with_the_first_reason_given(n, reasons, started, stop_after):
    """As Engine.abort: the first reason wins (a second SIGTERM's SHUT_DOWN, a client's ABORTED), for every
    sample, whether or not the request's pump has started; the replica's generation is cancelled."""
    pytest.importorskip("ray", reason="the 'scale' extra (ray[serve]) is not installed")
    from replicas.remote_engine import RemoteEngine

    async def main():
        handle = FakeHandle()
        engine = RemoteEngine(handle, FAKE_INFO)
        await engine.start()
        streams = await engine.add_parallel_requests([1, 2, 3], SamplingParams(max_tokens=4), n, "r")
        if started:
            await asyncio.sleep(0.01)
        for reason in reasons:
            engine.abort("r", reason)
        if stop_after:
            await engine.stop(0.0)
        ends = [[out async for out in s][-1].ended for s in streams]
        return ends, handle.generations[0].cancelled, engine.requests

    ends, cancelled, left = asyncio.run(asyncio.wait_for(main(), 30))
    assert ends == [reasons[0]] * n and cancelled and not left


def test_remote_stop_tells_requests_it_cut_that_the_server_shut_down():
    pytest.importorskip("ray", reason="the 'scale' extra (ray[serve]) is not installed")
    from replicas.remote_engine import RemoteEngine

    async def main():
        engine = RemoteEngine(FakeHandle(), FAKE_INFO)
        await engine.start()
        stream = await engine.add_request([1, 2], SamplingParams(max_tokens=4))
        await asyncio.sleep(0.01)
        await engine.stop(0.0)
        return [out async for out in stream][-1]

    last = asyncio.run(asyncio.wait_for(main(), 30))
    assert last.ended == EndReason.SHUT_DOWN and last.error == "shutdown"


# --- a Ray started here listens on loopback only ----------------------------------------------------------------

def listening_sockets(pid: int) -> list[tuple[int, str, tuple]]:
    """(pid, process name, local address) of every listening TCP socket and bound UDP socket of pid's tree."""
    import psutil
    root = psutil.Process(pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # SOCK_DGRAM: bound
                    found.append((p.pid, p.name(), tuple(c.laddr)))
        except psutil.Error:  # exited meanwhile
            pass
    return found


def loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def test_a_local_ray_listens_on_loopback_only_and_a_second_sigterm_ends_every_stream():
    """`jitney serve --replicas 2` on a loopback server: every socket of its process tree (front end, GCS,
    raylet, Serve controller, dashboard and runtime-env agents, metrics servers, the replicas) is on loopback.
    Runs before the module's own Ray (below) starts, so it is the only Ray this test process knows.
    Then (on the same server: a deployment costs ~12 s) the first SIGTERM starts the drain (grace 30 s) and the
    second cuts it: every stream in flight on the replicas still ends with a final error event (shutting_down)
    and [DONE], and the front end exits 0 at once. (A clean drain: test_sigterm_drains_every_replica_and_exits_0.)"""
    pytest.importorskip("ray", reason="the 'scale' extra (ray[serve]) is not installed")
    server = ServerProcess(*TINY, "--replicas", "2", "--cpus-per-replica", "1", grace_s=30)
    try:
        server.start()
        server.wait_ready(240)
        assert complete(server.url, "hello").status_code == 200

        def settled():  # both replicas report once: every process of the tree has started
            return len(replica_pids(server.url)) == 2

        assert wait_until(settled, timeout=60)
        sockets = listening_sockets(server.pid)
        names = {name for _, name, _ in sockets}
        assert {"gcs_server", "raylet"} <= names, sockets  # the walk sees Ray's own processes
        wide = [s for s in sockets if not loopback(s[2][0])]
        assert not wide, f"listening beyond loopback: {wide}"
        out = server.output()
        assert "jitney: 2 replicas x 1 CPU, --kv-cache-memory 0.03 GiB each" in out, out[-3000:]
        assert "every process of it listening on loopback only (127.0.0.1)" in out, out[-3000:]
        assert f"serving on http://127.0.0.1:{server.port} (loopback only)" in out

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                opened = [await open_stream(client, server.url, f"cut {i}", 900, n=8) for i in range(4)]
                firsts = [await anext(lines) for _, _, lines in opened]  # every stream has started
                server.signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                server.signal(signal.SIGTERM)
                return firsts, await asyncio.gather(*(read_all(lines) for _, _, lines in opened))

        firsts, bodies = asyncio.run(main())
        code = server.proc.wait(60)
    finally:
        server.stop(timeout=60)
        out = server.output()
        server.close()
    assert all(f.startswith("data: ") for f in firsts), (firsts, [b[-3:] for b in bodies])
    for body in bodies:
        assert body[-1] == "[DONE]" and body[-2]["error"]["code"] == "shutting_down", body[-3:]
    assert code == 0, out[-3000:]
    assert "\x1b[" not in out and "Traceback" not in out and "TypeError" not in out, out[-3000:]


# --- over HTTP, on Ray -----------------------------------------------------------------------------------------

TINY = ("--dtype", "float32", "--kv-cache-memory", "32MiB", "--max-wait-ms", "0")
SHARED = "You are a terse assistant for the billing team of a shipping company. " * 3  # several full blocks


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="the 'scale' extra (ray[serve]) is not installed")
    ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def servers(cluster):
    """(replica server, single-process server), both booted in parallel."""
    replicas = ServerProcess(*TINY, "--replicas", "2", "--cpus-per-replica", "1", "--ray-address", cluster,
                             "--routing", "prefix", "--routing-imbalance", "3", grace_s=30)
    try:
        replicas.start()
        with jitney_server(*TINY) as single:
            replicas.wait_ready(240)
            yield replicas, single
    finally:
        replicas.stop(timeout=60)
        replicas.close()


def complete(url: str, prompt: str, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0} | kw
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def metrics(url: str) -> dict:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)


def replica_pids(url: str) -> dict[str, int]:
    return {dict(labels)["replica"]: int(dict(labels)["pid"]) for (name, labels), v in metrics(url).items()
            if name == "jitney_replica_info" and v == 1}


def test_requests_sharing_a_prefix_land_on_one_replica(servers):
    url = servers[0].url
    wait_until(lambda: len(replica_pids(url)) == 2, timeout=30)  # both replicas have reported once
    for system in (SHARED, SHARED.upper()):
        seen = {complete(url, f"{system} Question {i}: where is my parcel?").headers["x-jitney-replica"]
                for i in range(5)}
        assert len(seen) == 1, seen
    m = metrics(url)
    assert m[("jitney_routing_decisions_total", (("decision", "prefix_hit"), ("policy", "prefix")))] >= 8
    assert m[("jitney_routing_prefix_hit_tokens_total", ())] > 0


def test_greedy_text_through_two_replicas_equals_one_process(servers):
    replicas, single = servers
    for i in range(6):
        prompt = f"Prompt number {i}: " + "abc " * (3 * i)
        a, b = complete(replicas.url, prompt, max_tokens=24), complete(single.url, prompt, max_tokens=24)
        assert a.status_code == b.status_code == 200
        assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
        assert "x-jitney-replica" not in b.headers  # one process: no replicas, no header


def test_response_format_works_over_replicas_as_in_one_process(servers):
    """The schema travels to the replica as its text and is compiled there (a compiled grammar is native state):
    the same constrained output as one process, and a schema the replica cannot enforce is the same 400."""
    replicas, single = servers
    schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
              "properties": {"ok": {"type": "boolean"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    a, b = (complete(s.url, "Give me JSON", max_tokens=40, response_format=fmt) for s in servers)
    assert a.status_code == b.status_code == 200, a.text
    text = a.json()["choices"][0]["text"]
    assert text == b.json()["choices"][0]["text"] and a.json()["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(text)["ok"], bool)
    bad = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"not": {}}}}}}
    a, b = (complete(s.url, "Give me JSON", response_format=bad) for s in servers)
    assert a.status_code == b.status_code == 400 and a.json()["error"]["code"] == "invalid_schema", a.text
    assert a.json()["error"]["message"] == b.json()["error"]["message"]


async def open_stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, n: int = 1):
    """Starts a streamed request; returns (response, replica, line iterator) once its headers are in."""
    req = client.build_request("POST", f"{url}/v1/completions", json={
        "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "n": n})
    resp = await client.send(req, stream=True)
    return resp, resp.headers.get("x-jitney-replica"), resp.aiter_lines()


async def read_all(lines) -> list:
    return sse_events([line async for line in lines])


def test_an_overloaded_replica_spills_to_the_other(servers):
    """Ten long requests with one prefix at once: the replica holding it takes them until it is more than
    --routing-imbalance (3) requests busier than the other, then the rest go to the other one."""
    url = servers[0].url

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            opened = [await open_stream(client, url, SHARED + f" user {i}", 600) for i in range(10)]
            bodies = await asyncio.gather(*(read_all(lines) for _, _, lines in opened))
            return [r for _, r, _ in opened], bodies

    chosen, bodies = asyncio.run(main())
    assert len(set(chosen)) == 2, chosen
    assert all(b[-1] == "[DONE]" and b[-2]["choices"][0]["finish_reason"] == "length" for b in bodies)
    m = metrics(url)
    assert m[("jitney_routing_decisions_total", (("decision", "prefix_hit"), ("policy", "prefix")))] >= 1


def test_metrics_add_up_across_replicas(servers):
    url = servers[0].url
    generated = ("jitney_generation_tokens_total", ())

    def quiet():  # no report in flight: two reads, more than two report periods apart, agree
        import time
        m = metrics(url)
        time.sleep(2.5)
        return m if metrics(url)[generated] == m[generated] else None

    before = wait_until(quiet, timeout=60)
    sent = [complete(url, f"{SHARED} count {i}", max_tokens=5 + i) for i in range(6)]
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in sent)
    after = wait_until(lambda: (m := metrics(url))[generated] == before[generated] + tokens and m, timeout=30)
    assert after, "the replicas' reports never added up to the tokens sent"
    per_replica = sum(v for (name, _), v in after.items() if name == "jitney_replica_generation_tokens_total")
    assert per_replica == after[generated]
    e2e = ("jitney_e2e_request_latency_seconds_count", ())
    assert after[e2e] == before[e2e] + len(sent)  # latencies: observed at the front end, every replica's
    steps = sum(v for (name, _), v in after.items() if name == "jitney_replica_engine_steps_total")
    assert steps == after[("jitney_engine_steps_total", ())] == after[("jitney_batch_size_count", ())]


def test_killing_a_replica_mid_stream_fails_its_requests_cleanly_and_service_continues(servers):
    url = servers[0].url
    pids = replica_pids(url)

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            resp, replica, lines = await open_stream(client, url, "kill me", 1000)
            first = await anext(lines)  # the stream has started on `replica`
            os.kill(pids[replica], signal.SIGKILL)
            rest = await read_all(lines)
            # Meanwhile new requests go to the survivor (or wait for a replica): none hangs, none is a 5xx.
            during = await asyncio.gather(*(client.post(f"{url}/v1/completions", json={
                "prompt": f"during {i}", "max_tokens": 4}) for i in range(4)))
            return resp.status_code, replica, first, rest, during

    status, replica, first, rest, during = asyncio.run(main())
    assert status == 200 and first.startswith("data: ")
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "replica_unavailable", rest[-3:]
    assert [r.status_code for r in during] == [200] * 4
    # Ray replaces the replica: two live replicas again, the killed one gone.
    renewed = wait_until(lambda: (p := replica_pids(url)) and len(p) == 2 and replica not in p and p, timeout=120)
    assert renewed, replica_pids(url)
    assert all(complete(url, f"after {i}").status_code == 200 for i in range(4))


def test_sigterm_drains_every_replica_and_exits_0(servers):
    server = servers[0]
    pids = replica_pids(server.url)
    mark = len(server.output())  # the kill test before this one leaves Ray's dead-actor report above here

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            opened = [await open_stream(client, server.url, f"drain {i} " + SHARED, 300) for i in range(6)]
            server.signal(signal.SIGTERM)
            return await asyncio.gather(*(read_all(lines) for _, _, lines in opened))

    bodies = asyncio.run(main())
    assert all(b[-2]["choices"][0]["finish_reason"] == "length" for b in bodies)  # all finished within the grace
    assert server.proc.wait(120) == 0, server.output()[-3000:]
    # A clean stop reads clean: no colour codes from Ray's prefixes, no failed-task or dead-actor reports.
    out = server.output()[mark:]
    assert "\x1b[" not in out and "actor is dead" not in out and "Traceback" not in out, out[-3000:]

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert wait_until(lambda: all(gone(p) for p in pids.values()), timeout=60), "replica processes outlived the drain"


def test_a_context_above_the_default_budget_is_served_when_the_host_holds_it():
    """--max-model-len long enough that one context passes the 2 GiB default: the budget rises to that context
    rather than refusing a host with room for it (the boundary the property test above found)."""
    plan = memory.plan_kv(2, 64 * GiB, 64 * GiB, GiB, 3 * GiB, None, 2 * GiB)
    assert plan.kv_bytes == 3 * GiB and "one whole context" in plan.note
