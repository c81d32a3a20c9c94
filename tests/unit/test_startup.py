"""Start-up: what a warm start of the CPU engine must not import or compute (speed itself lives in bench)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
import torch

from photoninfer.runner.cpu_kv_memory import lazy_zeros, prefault_in_background

HEAVY = ("transformers", "gguf", "fastapi", "uvicorn", "jinja2")


def _imported_after(code: str, cache: Optional[str] = None) -> dict:
    """Which HEAVY modules a fresh interpreter holds after running `code` (with its caches in `cache`)."""
    probe = f"{code}\nimport json, sys; print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    env = dict(os.environ, **({"PHOTONINFER_CACHE": cache} if cache else {}))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cli_imports_no_heavy_library():
    assert not any(_imported_after("import photoninfer.cli; photoninfer.cli.build_parser()").values())


def test_a_warm_cpu_engine_start_needs_neither_transformers_nor_gguf(default_gguf_path, tmp_path):
    code = (
        "from photoninfer import LLM, SamplingParams\n"
        f"llm = LLM({default_gguf_path!r}, device='cpu', num_kv_blocks=32)\n"
    )
    cache = str(tmp_path / "cache")  # private: other processes' entries cannot push ours out
    assert _imported_after(code, cache)["transformers"]  # the cold start converts and caches
    generate = "out = llm.chat([{'role': 'user', 'content': 'Hi'}], SamplingParams(max_tokens=2))\n"
    imported = _imported_after(code + generate + "assert len(out[0].outputs[0].token_ids) == 2\n", cache)
    assert not imported["transformers"] and not imported["gguf"] and not imported["fastapi"], imported


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lazy_zeros_is_a_writable_aligned_zero_tensor(dtype):
    shape = (2, 5, 16, 3, 64)
    x = lazy_zeros(shape, dtype)
    assert x.shape == shape and x.dtype == dtype and x.is_contiguous() and x.data_ptr() % 64 == 0
    assert not x.any()
    x[1, 4, 15, 2, 63] = 3.0  # the last element: the view covers the whole buffer
    x[0, 0, 0, 0, 0] = 1.0
    assert x.sum().item() == 4.0
    assert not lazy_zeros(shape, dtype).any()  # a second buffer is zero too (not a reused one)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


LAYER = (2, 1152, 16, 4, 64)  # 36 MiB


def fresh_cache(shape) -> torch.Tensor:
    """Zeros over an anonymous mapping: no page resident yet, whatever the allocator would have reused."""
    buffer = mmap.mmap(-1, int(np.prod(shape)) * 4)
    tensor = torch.frombuffer(buffer, dtype=torch.float32).view(shape)
    tensor.buffer = buffer  # keep the mapping alive with the tensor
    return tensor


def test_prefault_maps_the_cache_pages_and_keeps_what_is_written():
    """The background prefault makes the lazily zeroed pages resident (the engine's first writes then cost no
    page faults) and never changes their contents, even where K/V were written before it got there."""
    caches = [fresh_cache(LAYER) for _ in range(2)]
    caches[0][0, 200, 3] = 7.0
    caches[1][1, 5] = -1.0
    before = _resident_bytes()
    thread = prefault_in_background(caches, max_bytes=128 * 2**20)
    assert thread is not None
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert _resident_bytes() - before > 60 * 2**20  # most of the 72 MiB now resident
    assert caches[0][0, 200, 3].eq(7.0).all() and caches[1][1, 5].eq(-1.0).all()
    assert caches[0].sum().item() == 7.0 * 4 * 64 and caches[1].sum().item() == -1.0 * 16 * 4 * 64


def test_prefault_stops_at_its_byte_budget():
    caches = [fresh_cache(LAYER) for _ in range(2)]
    before = _resident_bytes()
    thread = prefault_in_background(caches, max_bytes=8 * 2**20)  # the lowest 128 blocks of each
    thread.join(timeout=60)
    assert 6 * 2**20 < _resident_bytes() - before < 24 * 2**20  # (huge pages may round each part up)


def test_weight_cache_key_follows_the_gguf_version(tmp_path, monkeypatch):
    import importlib.metadata

    from photoninfer.model import weight_cache

    monkeypatch.setenv("PHOTONINFER_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(100))
    first = weight_cache.entry_dir(str(path))
    assert weight_cache.entry_dir(str(path)) == first
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9" if name == "gguf" else real(name))
    assert weight_cache.entry_dir(str(path)) != first
