"""Command line: `photoninfer serve | generate | chat | bench`. With no --model, the bundled SmolLM2 is used."""

from __future__ import annotations

import argparse
import logging
import sys

from photoninfer.config import EngineConfig, cache_dir
from photoninfer.errors import ConfigError, PhotonInferError
from photoninfer.sampling_params import SamplingParams
from photoninfer.server.serve import add_serve_parser


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="HF model directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer path if different from --model")
    g.add_argument("--dtype", default=defaults.dtype, help="auto | float32 | bfloat16 | float16")
    g.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype,
                   help="auto (the model dtype) | fp8 (float8_e4m3fn: twice the tokens, half the attention reads)")
    g.add_argument("--device", default=defaults.device, help="auto | cpu | cuda")
    g.add_argument("--block-size", type=int, default=defaults.block_size)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=defaults.enable_prefix_caching, help="reuse KV blocks of repeated prompt prefixes")
    g.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens computed per step (default: 8192 on a GPU, 2048 on the CPU)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV cache size in blocks")
    g.add_argument("--kv-cache-memory-gb", type=float, default=defaults.kv_cache_memory_gb, help="CPU KV cache size")
    g.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization)
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs (every step runs eagerly)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=defaults.async_scheduling,
                   help="CUDA: overlap the host's scheduling and postprocessing with the device's step")
    g.add_argument("--threads", type=int, default=None, help="CPU compute threads (default: one per physical core)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
        device=args.device,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_gb=args.kv_cache_memory_gb,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, threads=args.threads,
    )


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sampling_seed, stop=args.stop,
    )


def run_generate(args: argparse.Namespace) -> None:
    from photoninfer.llm import LLM

    params = sampling_params_from_args(args)  # bad values fail before the model is loaded
    llm = LLM(**vars(engine_config_from_args(args)))
    prompts = args.prompt
    if args.chat_template:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, output in zip(prompts, outputs):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(output.outputs[0].text)


def run_chat(args: argparse.Namespace) -> None:
    from photoninfer.terminal_chat import chat_loop

    params = sampling_params_from_args(args)
    chat_loop(engine_config_from_args(args), params, system_prompt=args.system)


def run_bench_command(args: argparse.Namespace) -> None:
    from photoninfer.bench.peers import parse_peers
    from photoninfer.bench.random_model import build_random_model
    from photoninfer.bench.report import format_report
    from photoninfer.bench.runner import BenchOptions, run_bench, write_report
    from photoninfer.bench.workloads import parse_int_list
    from photoninfer.config import resolve_device

    config = engine_config_from_args(args)
    device = resolve_device(config.device)
    length_range = parse_int_list(args.len_range, "--len-range") if args.len_range else None
    if length_range is not None and len(length_range) != 2:
        raise ConfigError(f"--len-range takes MIN,MAX, got {args.len_range!r}")
    options = BenchOptions(
        workload=args.workload,
        concurrency=parse_int_list(args.concurrency, "--concurrency") if args.concurrency else None,
        prompt_len=args.prompt_len, output_len=args.output_len, num_requests=args.num_requests,
        len_range=tuple(length_range) if length_range else None, seed=args.workload_seed,
        peers=parse_peers(args.peers, device),
        hf_compile_backend=args.hf_compile_backend, hf_compile_mode=args.hf_compile_mode,
        profile=parse_int_list(args.profile, "--profile") if args.profile else [],
        profile_steps=args.profile_steps, random_shape=args.random_shape, out=args.out, argv=args.argv,
    )
    options.resolve(device)  # bad options fail before any model is built or loaded
    if args.random_shape:
        config.model = build_random_model(args.random_shape, cache_dir("bench", args.random_shape))
    report = run_bench(config, options)
    png = write_report(report, args.out)
    print(format_report(report))
    print(f"written to {args.out}" + (f" and {png}" if png else ""))


def add_bench_parser(sub) -> None:
    from photoninfer.bench.random_model import SHAPES
    from photoninfer.bench.workloads import WORKLOADS

    bench = sub.add_parser("bench", help="throughput, TTFT and start-up beside HF transformers, to JSON and PNG")
    add_engine_args(bench)
    g = bench.add_argument_group("benchmark (sizes left out take the device's defaults: see docs/benchmarks.md)")
    g.add_argument("--random-shape", default=None, choices=list(SHAPES),
                   help="random weights of a real model's shape instead of --model")
    g.add_argument("--workload", default="standard", choices=list(WORKLOADS),
                   help="standard: C requests of --prompt-len tokens generating --output-len at each --concurrency C; "
                        "nano-vllm: --num-requests requests with input and output lengths uniform in --len-range; "
                        "none: start-up, TTFT and --profile only")
    g.add_argument("--concurrency", default=None, help="comma-separated levels (CPU 1,16; GPU 1,4,16,64,256)")
    g.add_argument("--prompt-len", type=int, default=100, help="prompt tokens (standard workload and TTFT)")
    g.add_argument("--output-len", type=int, default=None, help="tokens generated per request (CPU 64; GPU 256)")
    g.add_argument("--num-requests", type=int, default=None, help="nano-vllm requests (CPU 16; GPU 256)")
    g.add_argument("--len-range", default=None, help="nano-vllm MIN,MAX lengths (CPU 100,256; GPU 100,1024)")
    g.add_argument("--workload-seed", type=int, default=0, help="seed of the nano-vllm lengths and prompts")
    g.add_argument("--peers", default=None,
                   help="comma-separated: hf-eager, hf-compiled, or none (default: both on CUDA, hf-eager on the CPU)")
    g.add_argument("--hf-compile-backend", default="inductor", help="torch.compile backend of hf-compiled")
    g.add_argument("--hf-compile-mode", default=None,
                   help="torch.compile mode of hf-compiled (default: reduce-overhead on CUDA, default elsewhere)")
    g.add_argument("--profile", default=None, metavar="C[,C...]",
                   help="also run torch.profiler over PhotonInfer's decode steps at these concurrencies")
    g.add_argument("--profile-steps", type=int, default=5, help="decode steps timed, and as many profiled")
    g.add_argument("--out", default="bench_results/bench.json", help="JSON path; the PNG goes beside it")
    bench.set_defaults(func=run_bench_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="photoninfer", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts and print the text")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=128)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: batched together)")
    gen.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user chat message")
    gen.set_defaults(func=run_generate)

    chat = sub.add_parser("chat", help="interactive chat in the terminal, tokens printed as they arrive")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=run_chat)

    add_bench_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by bench
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except PhotonInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
