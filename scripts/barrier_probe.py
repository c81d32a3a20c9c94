"""What a dependency between two phases of a decode step costs on this GPU: a grid barrier inside one persistent
Triton kernel against a boundary between two PDL kernels, each with and without reading 64 KB a program from L2.

    python scripts/barrier_probe.py

Why: a one-row decode step is a chain of short, dependent phases (norm, q/k/v, attention, o), and a persistent
kernel (docs/benchmarks.md, eighth session) trades kernel boundaries for barriers. On an H100 (thirteenth session):
a PDL boundary 0.79 us, a barrier 1.63 us (132 programs), and 64 KB a program read from L2 ~1.7 us on top, which is
what kernels/decode_gemv.py avoids by holding its weights in registers before the dependency resolves.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from photoninfer.kernels.pdl import AFTER_WAIT, begin as pdl_begin  # noqa: E402

ROWS, COLS = 16, 2048  # 64 KB of bf16 a program
ROUNDS = 200


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Arrive (release), then poll until every program of the grid has arrived `target` times in all (acquire)."""
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.load(counter_ptr, volatile=True)
    while seen < target:
        seen = tl.load(counter_ptr, volatile=True)
    tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _read_rows(data_ptr, pid, ROWS: tl.constexpr, COLS: tl.constexpr):
    offsets = (pid * ROWS + tl.arange(0, ROWS))[:, None] * COLS + tl.arange(0, COLS)[None, :]
    return tl.sum(tl.load(data_ptr + offsets).to(tl.float32), 0)


@triton.jit
def _persistent_kernel(counter_ptr, data_ptr, out_ptr, rounds, ROWS: tl.constexpr, COLS: tl.constexpr,
                       WORK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([COLS], tl.float32)
    for r in range(rounds):
        if WORK:
            acc += _read_rows(data_ptr, pid, ROWS, COLS)
        _grid_barrier(counter_ptr, (r + 1) * tl.num_programs(0))
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _phase_kernel(data_ptr, out_ptr, ROWS: tl.constexpr, COLS: tl.constexpr, WORK: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    pdl_begin(PDL)
    acc = tl.zeros([COLS], tl.float32)
    if WORK:
        acc += _read_rows(data_ptr, pid, ROWS, COLS)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def graph_us(fn, replays: int) -> float:
    """Mean time of one replay of `fn` captured in a CUDA graph, in us."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    data = torch.randn(sms * ROWS * COLS, device="cuda").to(torch.bfloat16)
    out = torch.zeros(sms, device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    for programs in (sms, 64):
        for work in (False, True):
            what = "+ 64 KB a program from L2" if work else "alone"

            def persistent():
                counter.zero_()
                _persistent_kernel[(programs,)](counter, data, out, ROUNDS, ROWS=ROWS, COLS=COLS, WORK=work,
                                                num_warps=8)

            def chain():
                for _ in range(ROUNDS):
                    _phase_kernel[(programs,)](data, out, ROWS=ROWS, COLS=COLS, WORK=work, PDL=AFTER_WAIT,
                                               num_warps=8, launch_pdl=True)

            print(f"{programs:3d} programs, {what:26s}: grid barrier {graph_us(persistent, 20) / ROUNDS:5.2f} us, "
                  f"PDL boundary {graph_us(chain, 5) / ROUNDS:5.2f} us", flush=True)


if __name__ == "__main__":
    main()
