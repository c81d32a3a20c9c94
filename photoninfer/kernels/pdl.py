"""Programmatic dependent launch (PDL, Hopper and newer): the next kernel of a stream is scheduled while
this one finishes.

Why: a decode step is a chain of ~100-250 short kernels (a few microseconds each at batch 1), and between
two of them the GPU drains the first, then launches and ramps up the second. A kernel launched with
`launch_pdl=True` may be scheduled once every program of the kernel before it has called
`gdc_launch_dependents` (or exited); it then waits in `gdc_wait` until that kernel has finished and its
writes are visible. So launch latency overlaps the previous kernel's tail.

The rule every PDL kernel keeps: `begin(PDL)` before it loads anything an earlier kernel wrote and
before it stores anything. Each kernel waits for the whole previous one, which waited for the one
before, so the chain stays ordered; kernels launched without PDL (cuBLAS, torch) wait as usual.

Where the trigger sits matters (H100, Llama-3.2-1B / SmolLM2-135M decode, docs/benchmarks.md): at a
kernel's start (EARLY) the next kernels pile up resident and waiting, several deep, and steps got slower;
right after the wait (AFTER_WAIT, the default) or after the main loop (AT_END) they got faster.
"""

import functools
import os

import torch
import triton
import triton.language as tl

from photoninfer.kernels import interpreting

# kernels prefetch what they will read into L2 before their PDL wait (prefetch_l2); "0" turns it off, for comparison
L2_PREFETCH = os.environ.get("PHOTONINFER_L2_PREFETCH", "1") != "0"
# ... over at most this many rows (tokens or sequences). H100 decode steps, Llama-3.2-1B / SmolLM2-135M: at one row
# 852-855 -> 860-861 tok/s (4 interleaved runs each) / 1,519 -> 1,618; at 16 rows Llama lost 1.3% (12,286 -> 12,132)
L2_PREFETCH_MAX_ROWS = 1
PDL_ENV = "PHOTONINFER_PDL"  # "0" launches every kernel plainly (for comparison)
# PDL pays where kernels are short (H100 SmolLM2-135M: 1 row 1,129 -> 1,345 tok/s) and costs where they are
# long (256 rows 121-124k -> 93-102k): kernels of more rows launch plainly
PDL_MAX_ROWS = 16

# When a kernel lets the next one be scheduled (the kernels' PDL constexpr; 0: launched without PDL):
EARLY = 1  # at its start, before its own wait: kernels may pile up several deep, resident and waiting
AFTER_WAIT = 2  # once the kernel before it has finished: at most one kernel waits ahead
AT_END = 3  # after its main loop: the next one overlaps only this one's epilogue and exit
MODES = {"early": EARLY, "after-wait": AFTER_WAIT, "end": AT_END}
MODE_ENV = "PHOTONINFER_PDL_TRIGGER"


def mode() -> int:
    """The trigger placement for kernels launched with PDL ($PHOTONINFER_PDL_TRIGGER, default after-wait)."""
    name = os.environ.get(MODE_ENV, "after-wait")
    if name not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {name!r}")
    return MODES[name]


def prefetches(rows: int) -> bool:
    """Whether a PDL kernel over `rows` rows prefetches into L2 before its wait (where its operands allow)."""
    return L2_PREFETCH and rows <= L2_PREFETCH_MAX_ROWS


def use_pdl(device: torch.device, rows: int = 1) -> int:
    """How a kernel over `rows` rows (tokens or sequences) on `device` uses PDL (the kernels' PDL constexpr):
    0 (launched plainly) unless on NVIDIA Hopper or newer, compiled (the interpreter has no grid dependencies), at
    most PDL_MAX_ROWS rows, and not turned off by PHOTONINFER_PDL=0; otherwise where each kernel lets the
    next one start (mode()). Any mix of PDL and plain launches stays ordered, so each kernel decides alone."""
    if device.type != "cuda" or rows > PDL_MAX_ROWS or interpreting() or os.environ.get(PDL_ENV, "1") == "0":
        return 0
    if torch.version.hip:  # ROCm reports its own "capabilities" (MI300: 9.4); PDL is NVIDIA's (sm_90+)
        return 0
    if _capability(device.index if device.index is not None else torch.cuda.current_device()) < 9:
        return 0
    return mode()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def begin(PDL: tl.constexpr):
    """At a kernel's start, before it touches anything an earlier kernel wrote: waits for the kernel before
    it (and, by PDL's placement, lets the next one be scheduled)."""
    if PDL == 1:  # EARLY
        tl.extra.cuda.gdc_launch_dependents()
    if PDL != 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 2:  # AFTER_WAIT
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def end(PDL: tl.constexpr):
    """After a kernel's main loop: lets the next kernel be scheduled when the placement is AT_END."""
    if PDL == 3:  # AT_END
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(start, nbytes):
    """Asks the TMA unit to bring `nbytes` (a multiple of 16) from global address `start` (16-byte aligned) into
    L2, and goes on at once: thread 0 of the program issues one `cp.async.bulk.prefetch.L2` (sm_90+). A cache
    hint only, so it is safe before `begin`'s wait; what is prefetched must lie inside one allocation."""
    tl.inline_asm_elementwise(
        "{\n.reg .pred %pf_first;\n.reg .b32 %pf_tid;\nmov.u32 %pf_tid, %tid.x;\n"
        "setp.eq.u32 %pf_first, %pf_tid, 0;\n"
        "@%pf_first cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;\n}",
        "=r,l,r", [start, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_l2_each(starts, nbytes):
    """prefetch_l2 for every address of the tensor `starts` (each 16-byte aligned, `nbytes` a multiple of 16), issued
    by the threads that hold them (a thread holding several issues each; copies held by several threads repeat)."""
    tl.inline_asm_elementwise(
        "{\ncp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;\n}",
        "=r,l,r", [starts, nbytes], dtype=tl.int32, is_pure=False, pack=1)
