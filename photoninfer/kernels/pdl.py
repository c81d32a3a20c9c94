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
