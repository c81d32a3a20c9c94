"""Does Triton's float32/bfloat16 -> float8_e4m3fn conversion round as torch's does, on this GPU?

    python scripts/fp8_rounding_check.py

Prints, per source dtype, the fraction of random values whose FP8 bytes differ and a few examples. On an H100
(torch 2.11, Triton 3.6) only values beyond +-448 differ: Triton saturates, torch on CUDA gives NaN (on the CPU
it saturates). So the torch reference clamps first (runner/attention.py `to_cache_dtype`).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _to_fp8(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n).to(y_ptr.dtype.element_ty), mask=i < n)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(1 << 20, generator=gen) * torch.exp2(torch.randint(-12, 9, (1 << 20,), generator=gen))).to(dtype).cuda()
        y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device="cuda")
        _to_fp8[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
        want = x.to(torch.float8_e4m3fn)
        bad = y.view(torch.uint8) != want.view(torch.uint8)
        print(f"{dtype}: {bad.float().mean().item():.2e} of values differ; e.g. x={x[bad][:4].tolist()} "
              f"triton={y[bad][:4].float().tolist()} torch={want[bad][:4].float().tolist()}")


if __name__ == "__main__":
    main()
