"""Which kernel runs each decode-size linear layer: cuBLAS, or a Triton small-M kernel where it measures faster.

At a decode step's few rows (M <= 16) a linear layer is a pass over its weight, and no single kernel wins every
shape: on an H200, cuBLAS is faster for Llama-3.2-1B's q/k/v and gate/up at one row, while Triton's tl.dot
kernel reads the 128k-row LM head 13% faster at 8-16 rows and the FMA kernel SmolLM2's small matrices ~15%
faster at one row (scripts/bench_gemv.py). So at start-up every distinct (N, K) of the model is timed, per
captured batch size M <= 16, for cuBLAS and a few candidate configs, the way a decode step runs them: inside
one CUDA graph over enough weight copies that none is in L2. A Triton config replaces cuBLAS only when it is
at least MARGIN faster. The choice is cached on disk per card and software versions (a later start reads it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Callable, Optional

import torch

from photoninfer.config import cache_dir

logger = logging.getLogger(__name__)

MARGIN = 0.03  # a Triton config must beat cuBLAS by 3%: below that, timing noise decides
COLD_BYTES = 256 * 2**20  # weight copies per timing: several times the L2 of an H100/H200 (50 MiB)
MAX_COPIES = 32

Key = tuple[int, int, int]  # (N, K, M)


def candidate_configs(n: int, k: int, m: int) -> list:
    """The configs worth timing for this shape: the winners of scripts/bench_gemv.py's sweeps on an H200."""
    from photoninfer.kernels.gemv import FMA_MAX_M, MAX_M, GemvConfig

    if m > MAX_M:
        return []
    if m <= FMA_MAX_M:
        tiles = [(8, 512, 1, 2), (8, 512, 4, 2), (8, 512, 8, 4), (16, 512, 1, 4)]
        return [GemvConfig(bn, bk, split, 4, stages, fma=True) for bn, bk, split, stages in tiles
                if k % split == 0 and k // split >= bk // 2]
    tiles = [(32, 256, 1, 4), (32, 256, 1, 3), (64, 128, 1, 4), (32, 128, 4, 4), (64, 128, 4, 4)]
    return [GemvConfig(bn, bk, split, 4, stages) for bn, bk, split, stages in tiles if k % (bk * split) == 0]


def graph_time_us(calls: list[Callable[[], object]], repeats: int = 5) -> float:
    """Median time of one call when all `calls` run back to back inside one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # compile and warm up outside the capture
            call()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def choose(timings: dict[Optional[object], float]) -> Optional[object]:
    """The fastest config if it beats cuBLAS (the None entry) by MARGIN, else None (cuBLAS)."""
    cublas = timings[None]
    best = min((c for c in timings if c is not None), key=timings.get, default=None)
    if best is not None and timings[best] < cublas * (1 - MARGIN):
        return best
    return None


def time_shape(n: int, k: int, m: int, dtype: torch.dtype, device: torch.device) -> dict:
    """cuBLAS's and each candidate's time (µs) for x[M, K] @ W[N, K]^T over cold weight copies."""
    from photoninfer.kernels.gemv import small_m_linear

    copies = max(2, min(MAX_COPIES, COLD_BYTES // (n * k * dtype.itemsize)))
    weights = [torch.randn(n, k, device=device).to(dtype) for _ in range(copies)]
    x = torch.randn(m, k, device=device).to(dtype)
    out = torch.empty(m, n, dtype=dtype, device=device)
    timings = {None: graph_time_us([lambda w=w: torch.mm(x, w.t(), out=out) for w in weights])}
    for config in candidate_configs(n, k, m):
        workspace = torch.empty(config.split_k * m * n, dtype=torch.float32, device=device)
        try:
            timings[config] = graph_time_us([lambda w=w, c=config: small_m_linear(x, w, config=c, out=out,
                                                                                 workspace=workspace)
                                             for w in weights])
        except Exception as exc:  # a config this card's compiler rejects: cuBLAS or another candidate runs
            logger.warning("small-M linear config %s failed for [%d, %d] x [%d, %d]^T: %s", config, m, k, n, k, exc)
    return timings


def tune(shapes: set[tuple[int, int]], batch_sizes: list[int], dtype: torch.dtype,
         device: torch.device, cache: Optional[str] = None) -> dict[Key, object]:
    """The chosen Triton config per (N, K, M) (absent: cuBLAS), from the disk cache or measured now."""
    from photoninfer.kernels.gemv import MAX_M

    keys = sorted((n, k, m) for n, k in shapes for m in batch_sizes if m <= MAX_M)
    path = cache or _cache_path(dtype, device)
    known = _read_cache(path)
    missing = [key for key in keys if _key_name(key) not in known]
    if missing:
        start = time.perf_counter()
        for n, k, m in missing:
            known[_key_name((n, k, m))] = _config_dict(choose(time_shape(n, k, m, dtype, device)))
        _write_cache(path, known)
        logger.info("timed %d decode linear shapes against cuBLAS in %.1f s", len(missing), time.perf_counter() - start)
    return {key: _config(known[_key_name(key)]) for key in keys if known[_key_name(key)] is not None}


def apply(model, chosen: dict[Key, object]) -> int:
    """Give every dense linear layer (and a tied LM head) its chosen configs; returns how many were given one."""
    from photoninfer.model.layers import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:
            n, k = module.weight.shape
            module.small_m_configs = {m: c for (cn, ck, m), c in chosen.items() if (cn, ck) == (n, k)}
            count += bool(module.small_m_configs)
    if model.lm_head is None:
        n, k = model.embed_tokens.weight.shape
        model.head_small_m_configs = {m: c for (cn, ck, m), c in chosen.items() if (cn, ck) == (n, k)}
        count += bool(model.head_small_m_configs)
    return count


def linear_shapes(model) -> set[tuple[int, int]]:
    """(N, K) of every dense linear layer and of a tied LM head."""
    from photoninfer.model.layers import Linear

    shapes = {tuple(m.weight.shape) for m in model.modules() if type(m) is Linear}
    if model.lm_head is None:
        shapes.add(tuple(model.embed_tokens.weight.shape))
    return shapes


def _key_name(key: Key) -> str:
    return "x".join(map(str, key))


def _config_dict(config) -> Optional[dict]:
    return None if config is None else asdict(config)


def _config(values: dict):
    from photoninfer.kernels.gemv import GemvConfig

    return GemvConfig(**values)


def _cache_path(dtype: torch.dtype, device: torch.device) -> str:
    import triton

    name = torch.cuda.get_device_name(device).replace(" ", "_").replace("/", "_")
    return cache_dir("gemv", f"{name}-{str(dtype).removeprefix('torch.')}-torch{torch.__version__}-"
                             f"triton{triton.__version__}.json")


def _read_cache(path: str) -> dict:
    """The cached choices; an unreadable or malformed file counts as empty (everything is timed again)."""
    try:
        with open(path) as f:
            known = json.load(f)
        from photoninfer.kernels.gemv import GemvConfig

        for value in known.values():
            if value is not None:
                GemvConfig(**value)
        return known
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _write_cache(path: str, known: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(known, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the choices are simply measured again next start
        logger.warning("could not cache the linear-kernel choices in %s: %s", path, exc)
