"""Triton kernels of the GPU fast path, one kernel family per file.

Each file names its torch reference (photoninfer/model/layers.py, photoninfer/runner/attention.py), which
the CPU backend runs and tests/kernels compares against under the Triton interpreter. Nothing here is
imported by `import photoninfer`: the modules import triton at their top, so import them only on the
CUDA path (the CPU runtime works without triton installed).
"""

import os


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    The interpreter keeps bfloat16 as raw uint16 bits, so `tl.dot` on bfloat16 tiles would multiply bit
    patterns; kernels that feed tl.dot take an UPCAST_DOT flag from this and widen operands to float32
    first (exact: a bf16 x bf16 product fits in float32, and tl.dot accumulates in float32 anyway).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
