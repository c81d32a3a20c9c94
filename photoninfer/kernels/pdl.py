"""Programmatic dependent launch (PDL, Hopper and newer): the next kernel of a stream starts while this
one finishes.

Why: a decode step is a chain of ~100-250 short kernels (a few microseconds each at batch 1), and between
two of them the GPU drains the first, then launches the second and ramps it up: ~1-2 us a boundary in
which no weight is read. A kernel launched with `launch_pdl=True` may be scheduled as soon as every
program of the one before has called `gdc_launch_dependents`; it then waits in `gdc_wait` until that
kernel has finished and its writes are visible. Work that needs nothing from the previous kernel (an L2
prefetch of this kernel's own weights, `prefetch_l2`) runs before the wait.

The rule every PDL kernel keeps: no load of anything an earlier kernel wrote, and no store, before
`wait_for_previous`. Since each kernel waits for the whole previous one, which waited for the one before,
the chain stays ordered; kernels launched without PDL (cuBLAS, torch) wait for everything as usual.
"""

import os

import triton
import triton.language as tl

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
def prefetch_l2(ptrs):
    """Ask L2 to fetch the lines at `ptrs`, which must all be valid addresses (no registers are filled and
    nothing is waited for)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
