"""`bench --profile C`: torch.profiler over a few decode steps of PhotonInfer at concurrency C.

C requests are prefilled first, then a few warm-up steps run, then `steps` decode steps are timed without the
profiler and `steps` more run under it. The device is synchronized only before and after each series, never
between steps, so that a step overlapping the next (async scheduling) is measured as it runs.
The headline numbers: host_ms_per_step (wall time per step in the steady state: what the host takes, or the
device when it is the slower), device_ms_per_step (the kernels' time summed), kernel launches per step (CUDA
launch calls; a graph replay is one) and the top ops by self device time and by self CPU time. The device's idle
time between kernels (device_idle_ms_per_step, and the kernel pairs with the most idle time between them) tells
launch gaps, which no kernel's own time shows, from slow kernels.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from photoninfer.bench.workloads import random_prompt
from photoninfer.errors import ConfigError
from photoninfer.sampling_params import SamplingParams

WARMUP_STEPS = 2
TOP_OPS = 15
_LAUNCH = re.compile(r"^(cuda|cu)\w*(LaunchKernel|GraphLaunch|LaunchCooperativeKernel)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_decode(engine, concurrency: int, prompt_len: int, vocab_size: int, steps: int) -> dict:
    """Profile `steps` decode steps of an LLMEngine running `concurrency` sequences of `prompt_len` tokens."""
    if concurrency > engine.config.max_num_seqs:
        raise ConfigError(f"--profile concurrency {concurrency} exceeds max_num_seqs {engine.config.max_num_seqs}")
    rng = random.Random(f"profile-{concurrency}")
    # enough tokens that no request ends while measured (async scheduling runs a step ahead of the outputs)
    params = SamplingParams(temperature=0.0, max_tokens=WARMUP_STEPS + 2 * steps + 8, ignore_eos=True)
    request_ids = [f"profile-{concurrency}-{i}" for i in range(concurrency)]
    for request_id in request_ids:
        engine.add_request(request_id, random_prompt(prompt_len, vocab_size, rng), params)
    try:
        _prefill_all(engine, concurrency)
        for _ in range(WARMUP_STEPS):
            engine.step()
        host_ms, decode_only = _timed_steps(engine, steps)
        with profile(activities=_activities(engine.device)) as prof:
            profiled_ms, profiled_decode_only = _timed_steps(engine, steps)
    finally:
        for request_id in request_ids:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():  # read back the step still in flight
            engine.step()
    return {
        "concurrency": concurrency, "prompt_len": prompt_len, "steps": steps,
        "async_scheduling": getattr(engine, "async_scheduling", False),
        "decode_only": decode_only and profiled_decode_only,
        "host_ms_per_step": round(host_ms, 3),
        "profiled_host_ms_per_step": round(profiled_ms, 3),
        **summarize(prof.events(), prof.key_averages(), steps, engine.device),
    }


def _prefill_all(engine, concurrency: int) -> None:
    """Step until every request has its first token, so that what follows is decode only."""
    started = set()
    while len(started) < concurrency and engine.has_unfinished_requests():
        started.update(output.request_id for output in engine.step())


def _is_decode_step(engine) -> bool:
    stats = engine.stats()
    return stats.last_step_num_tokens == stats.last_step_num_seqs


def _timed_steps(engine, steps: int) -> tuple[float, bool]:
    """Mean wall time per step over `steps` steps, and whether every one of them was decode only."""
    decode_only = True
    _sync(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
        decode_only &= _is_decode_step(engine)
    _sync(engine.device)
    return (time.perf_counter() - start) * 1000 / steps, decode_only


def _activities(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def summarize(events, averages, steps: int, device: torch.device) -> dict:
    """Per-step headline numbers from a profiler's events and their per-name averages."""
    on_device = [e for e in events if e.device_type != DeviceType.CPU]
    launches = [e for e in events if e.device_type == DeviceType.CPU and _LAUNCH.match(e.name)]
    host_ops = [a for a in averages if a.device_type == DeviceType.CPU]
    device_ops = [a for a in averages if a.device_type != DeviceType.CPU]
    has_device = device.type != "cpu"
    device_ms = sum(e.device_time_total for e in on_device) / 1000
    return {
        "device_ms_per_step": round(device_ms / steps, 3) if has_device else None,
        "device_kernels_per_step": round(len(on_device) / steps, 1) if has_device else None,
        "kernel_launches_per_step": round(len(launches) / steps, 1) if has_device else None,
        "top_ops_by_self_device_time": _top(device_ops, "self_device_time_total", steps),
        "top_ops_by_self_cpu_time": _top(host_ops, "self_cpu_time_total", steps),
        **(device_gaps(on_device, steps) if has_device else {}),
    }


def device_gaps(on_device, steps: int) -> dict:
    """Time the device ran nothing between the first and last profiled kernel or copy (intervals that
    overlap, as PDL's do, count once), per step, and the (kernel before, kernel after) pairs with the most
    of it. Events without a time range are left out."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in on_device
                   if getattr(e, "time_range", None) is not None)
    idle, by_pair = 0.0, Counter()
    busy_until, last_name = None, None
    for start, end, name in spans:
        if busy_until is not None and start > busy_until:
            idle += start - busy_until
            by_pair[(last_name[:60], name[:60])] += start - busy_until
        if busy_until is None or end > busy_until:
            busy_until, last_name = end, name
    return {
        "device_idle_ms_per_step": round(idle / 1000 / steps, 3),
        "top_device_gaps": [{"after": after, "before": before, "idle_ms_per_step": round(us / 1000 / steps, 4)}
                            for (after, before), us in by_pair.most_common(8)],
    }


def _top(averages, attribute: str, steps: int) -> list[dict]:
    total = sum(getattr(a, attribute) for a in averages) or 1
    ranked = sorted(averages, key=lambda a: getattr(a, attribute), reverse=True)[:TOP_OPS]
    return [{"name": a.key[:160], "calls_per_step": round(a.count / steps, 2),
             "self_ms_per_step": round(getattr(a, attribute) / 1000 / steps, 4),
             "percent": round(100 * getattr(a, attribute) / total, 1)}
            for a in ranked if getattr(a, attribute) > 0]
