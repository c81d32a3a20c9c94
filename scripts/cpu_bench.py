"""CPU figures of issue 9 for the bundled SmolLM2 GGUF (until `photoninfer bench` covers the CPU):
single-stream and 16-concurrent greedy decode tok/s, 100-token prompt latency, and start-up, per dtype,
beside HF transformers float32. Usage: python scripts/cpu_bench.py [--dtypes auto,float32] [--hf] [--model X.gguf]
(--model: another GGUF, e.g. one written by scripts/requantize_gguf.py; --hf always runs the bundled one)"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

NEW_TOKENS = 64


def bench_photoninfer(dtype: str, threads, model=None) -> dict:
    from photoninfer import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, device="cpu", threads=threads)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompt = [{"role": "user", "content": "What is the capital of France? Explain in detail."}]
    llm.chat([prompt], params)  # warm-up
    t = time.perf_counter()
    llm.chat([prompt], params)
    single = NEW_TOKENS / (time.perf_counter() - t)
    batch = [[{"role": "user", "content": f"Tell me a story about a dragon, number {i}."}] for i in range(16)]
    t = time.perf_counter()
    llm.chat(batch, params)
    concurrent = 16 * NEW_TOKENS / (time.perf_counter() - t)
    ids = list(range(1000, 1100))  # 100 prompt tokens, one generated: the prefill latency
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for i in range(5):
        t = time.perf_counter()
        llm.generate([[ids[0] + i] + ids[1:]], one)  # a new first token: no prefix-cache hit
        times.append(time.perf_counter() - t)
    return {"single_tok_s": single, "concurrent16_tok_s": concurrent, "ttft_100_ms": 1000 * min(times)}


def bench_hf(threads) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from photoninfer.model.loader import default_model_path

    torch.set_num_threads(threads or torch.get_num_threads())
    path = default_model_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    ids = tok("What is the capital of France? Explain in detail.", return_tensors="pt")
    with torch.inference_mode():
        model.generate(**ids, **kwargs)
        t = time.perf_counter()
        model.generate(**ids, **kwargs)
        single = NEW_TOKENS / (time.perf_counter() - t)
        tok.padding_side = "left"
        tok.pad_token = tok.pad_token or tok.eos_token
        batch = tok([f"Tell me a story about a dragon, number {i}." for i in range(16)], return_tensors="pt", padding=True)
        t = time.perf_counter()
        model.generate(**batch, **kwargs)
        concurrent = 16 * NEW_TOKENS / (time.perf_counter() - t)
        prompt = torch.arange(1000, 1100)[None]
        times = []
        for _ in range(5):
            t = time.perf_counter()
            model(prompt)
            times.append(time.perf_counter() - t)
    return {"single_tok_s": single, "concurrent16_tok_s": concurrent, "ttft_100_ms": 1000 * min(times)}


def startup_seconds(dtype: str, model=None) -> float:
    code = f"from photoninfer import LLM; LLM({model!r}, dtype={dtype!r}, device='cpu')"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtypes", default="auto,float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hf", action="store_true", help="also run HF transformers float32")
    parser.add_argument("--model", default=None, help="a GGUF (default: the bundled SmolLM2 Q4_1)")
    args = parser.parse_args()
    report = {"cpu": _cpu_model(), "model": args.model or "bundled", "load_average_before": os.getloadavg()}
    for dtype in args.dtypes.split(","):
        startup_seconds(dtype, args.model)  # fills the caches
        report[f"photoninfer_{dtype}"] = {**bench_photoninfer(dtype, args.threads, args.model),
                                          "second_start_s": startup_seconds(dtype, args.model)}
    if args.hf:
        report["hf_transformers_float32"] = bench_hf(args.threads)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
