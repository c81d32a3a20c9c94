"""Argument checks shared by the kernel wrappers: a wrong shape or dtype is a programming error in the
caller, reported as a ValueError/TypeError that names the argument instead of a crash inside a kernel."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


CACHE_DTYPES = FLOAT_DTYPES + (torch.float8_e4m3fn,)  # a KV cache may also hold FP8 (kv_cache_dtype="fp8")


def check_cache_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in CACHE_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float8_e4m3fn, got {t.dtype}")


def check_dim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, dtypes) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be one of {[str(d) for d in dtypes]}, got {t.dtype}")


def check_power_of_two(name: str, value: int, low: int, high: int) -> None:
    if value < low or value > high or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{low}, {high}], got {value}")


def check_accumulator(name: str, t: torch.Tensor, rows: int, cols: int) -> None:
    """A float32 [rows, cols] buffer that kernels add into (or clear) by flat index: contiguous, exactly that shape."""
    if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name} must be a contiguous float32 [{rows}, {cols}] tensor, got {t.dtype} {tuple(t.shape)}")
