"""Triton kernels of the GPU fast path, one kernel family per file.

Each file names its torch reference (photoninfer/model/layers.py, photoninfer/runner/attention.py), which
the CPU backend runs and tests/kernels compares against under the Triton interpreter. Nothing here is
imported by `import photoninfer`: the modules import triton at their top, so import them only on the
CUDA path (the CPU runtime works without triton installed).
"""

import functools
import os

import torch

PDL_ENV = "PHOTONINFER_PDL"  # "0" launches every kernel plainly (for comparison)
# PDL pays where kernels are short (H100 SmolLM2-135M: 1 row 1,129 -> 1,345 tok/s) and costs where they are
# long (256 rows 121-124k -> 93-102k): kernels of more rows launch plainly
PDL_MAX_ROWS = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    The interpreter keeps bfloat16 as raw uint16 bits, so `tl.dot` on bfloat16 tiles would multiply bit
    patterns; kernels that feed tl.dot take an UPCAST_DOT flag from this and widen operands to float32
    first (exact: a bf16 x bf16 product fits in float32, and tl.dot accumulates in float32 anyway).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_pdl(device: torch.device, rows: int = 1) -> int:
    """How a kernel over `rows` rows (tokens or sequences) on `device` uses programmatic dependent launch (the
    kernels' PDL constexpr, kernels/pdl.py): 0 (launched plainly) unless on Hopper or newer, compiled (the
    interpreter has no grid dependencies), at most PDL_MAX_ROWS rows, and not turned off by
    PHOTONINFER_PDL=0; otherwise where each kernel lets the next one start (pdl.mode()). Any mix of PDL and
    plain launches stays ordered, so each kernel decides alone."""
    if device.type != "cuda" or rows > PDL_MAX_ROWS or interpreting() or os.environ.get(PDL_ENV, "1") == "0":
        return 0
    if _capability(device.index if device.index is not None else torch.cuda.current_device()) < 9:
        return 0
    from photoninfer.kernels import pdl

    return pdl.mode()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]
