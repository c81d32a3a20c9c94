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

import triton
import triton.language as tl


@triton.jit
def let_next_start(PDL: tl.constexpr):
    """Allow the next kernel in the stream to be scheduled (it still waits for this one's results)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Block until the previous kernel in the stream has finished and its stores are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 to fetch the lines at `ptrs`, which must all be valid addresses (no registers are filled and
    nothing is waited for)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
