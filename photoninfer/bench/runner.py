"""`photoninfer bench`: the same greedy workload on PhotonInfer and on HF transformers, in one process on one
device, written to JSON.

Workload: `concurrency` requests of `prompt_len` random token ids, each generating exactly `output_len` tokens
(EOS is banned until then on both sides), all submitted at once; plus the time to first token of a single
`prompt_len` prompt. HF runs first and is freed before PhotonInfer sizes its KV cache from the free memory.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from photoninfer.config import EngineConfig, resolve_device, resolve_dtype
from photoninfer.sampling_params import SamplingParams

HF = "hf-transformers"
OURS = "photoninfer"


@dataclass
class Result:
    engine: str
    concurrency: int
    elapsed_s: float
    output_tokens: int
    output_tok_per_s: float
    agreement_with_hf: float | None = None  # mean fraction of each output equal to HF's before they differ


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab_size, (length,), generator=g).tolist() for _ in range(count)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - start, value


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    fractions = []
    for a, b in zip(ours, theirs):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fractions.append(same / max(len(b), 1))
    return statistics.fmean(fractions)


class HFPeer:
    """HF transformers' own generate() with its KV cache: the reference every figure is compared to."""

    name = HF

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device):
        from transformers import AutoModelForCausalLM

        self.device = device
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        ids = torch.tensor(prompts, device=self.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=output_len,
                                  min_new_tokens=output_len, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    def close(self) -> None:
        del self.model


class PhotonInferRunner:
    name = OURS

    def __init__(self, config: EngineConfig):
        from photoninfer.llm import LLM

        fields = {k: v for k, v in asdict(config).items() if k != "model"}
        self.llm = LLM(config.model, **fields)

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, min_tokens=output_len)
        return [o.outputs[0].token_ids for o in self.llm.generate(prompts, params)]

    def close(self) -> None:
        del self.llm


def measure(runner, concurrency_levels: list[int], prompt_len: int, output_len: int, vocab_size: int,
            device: torch.device, reference: dict | None = None) -> tuple[list[Result], float, dict]:
    """Throughput at each concurrency and the median TTFT of one prompt; returns the outputs for agreement."""
    runner.generate(random_prompts(2, 16, vocab_size, seed=99), 4)  # warm-up: kernels, allocator, caches
    ttft = statistics.median(
        _timed(lambda: runner.generate(random_prompts(1, prompt_len, vocab_size, seed=i), 1), device)[0]
        for i in range(5))
    results, outputs = [], {}
    for concurrency in concurrency_levels:
        prompts = random_prompts(concurrency, prompt_len, vocab_size, seed=concurrency)
        elapsed, out = _timed(lambda: runner.generate(prompts, output_len), device)
        tokens = sum(len(o) for o in out)
        agreement = _agreement(out, reference[concurrency]) if reference else None
        results.append(Result(runner.name, concurrency, round(elapsed, 4), tokens, round(tokens / elapsed, 2), agreement))
        outputs[concurrency] = out
    return results, ttft, outputs


def run_bench(config: EngineConfig, concurrency_levels: list[int], prompt_len: int, output_len: int,
              peers: list[str], out_path: str) -> dict:
    from photoninfer.model.loader import default_model_path, load_checkpoint

    model_path = config.model or default_model_path()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    vocab_size = load_checkpoint(model_path).config.vocab_size
    config.model = model_path
    ttfts, results, reference = {}, [], None
    if "hf" in peers:
        peer = HFPeer(model_path, dtype, device)
        peer_results, ttfts[HF], reference = measure(peer, concurrency_levels, prompt_len, output_len, vocab_size, device)
        results += peer_results
        peer.close()
        del peer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours = PhotonInferRunner(config)
    our_results, ttfts[OURS], _ = measure(ours, concurrency_levels, prompt_len, output_len, vocab_size, device, reference)
    results += our_results
    report = {
        "meta": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "model": model_path, "dtype": str(dtype).removeprefix("torch."),
            "prompt_len": prompt_len, "output_len": output_len, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "ttft_s": {k: round(v, 5) for k, v in ttfts.items()},
        "results": [asdict(r) for r in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['meta']['device']}  {report['meta']['model']}  {report['meta']['dtype']}  "
             f"prompt {report['meta']['prompt_len']} / output {report['meta']['output_len']} tokens"]
    lines += [f"TTFT {engine}: {seconds * 1000:.1f} ms" for engine, seconds in report["ttft_s"].items()]
    lines.append(f"{'engine':<16} {'concurrency':>11} {'output tok/s':>13} {'agreement':>10}")
    for r in report["results"]:
        agreement = "" if r["agreement_with_hf"] is None else f"{r['agreement_with_hf']:.2f}"
        lines.append(f"{r['engine']:<16} {r['concurrency']:>11} {r['output_tok_per_s']:>13.1f} {agreement:>10}")
    return "\n".join(lines)
