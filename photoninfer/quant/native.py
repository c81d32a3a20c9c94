"""Our native CPU kernels: built with the system C compiler on first use, cached, loaded with ctypes.
q4_kernels.c: the 4-bit matmul (float32, GGUF Q4_0/Q4_1/Q4_K weights in panels); int8_kernels.c: the same over
int8 codes (Q8_0, Q5_K, Q6_K, mixed K-quant layers); packed_matmul.c: one entry point for every FORMATS entry;
cpu_layer.c: a whole decoder layer of a decode step on top of them (used by model/cpu_fast.py).

The shared library is cached under the PhotonInfer cache dir (native/), keyed by a hash of the sources, the
flags and the compiler's version, so it is built once per machine (a few seconds). `-march=native` picks the
kernels' AVX-512 path, else their AVX2+FMA path (q4_simd() says 512 or 256). No compiler, a failed build or a CPU
that is not x86-64 (or lacks AVX2: the scalar path is slower than torch's kernel): `kernel()` returns None after
one warning, and callers keep torch's path. ISA_FLAGS build the other paths on this CPU (tests, benchmarks).

ctypes releases the GIL around the call; threads are OpenMP's, as many as torch uses. The library needs
libgomp.so.1, which resolves to the copy torch has loaded already, so both share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from photoninfer.config import cache_dir

logger = logging.getLogger(__name__)

SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
           for name in ("q4_kernels.c", "int8_kernels.c", "packed_matmul.c", "cpu_layer.c")]
PANEL = 16  # rows of a panel (every format)
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"]
LIBS = ["-lm"]
DISABLE_ENV = "PHOTONINFER_NATIVE"  # "0" turns the native kernel off (torch's path is used); "avx2" builds it
# without AVX-512 (what an AVX2 CPU runs, to measure it on an AVX-512 one)
ISA_FLAGS = {"avx2": ["-mno-avx512f"], "scalar": ["-mno-avx2"]}  # after FLAGS: a path below this CPU's best

_kernel: Optional["Q4Kernel"] = None
_tried = False


@dataclass(frozen=True)
class Format:
    """A packed weight layout: its number in packed_matmul.c, the inputs of one record and a record's bytes (a
    record: those inputs of a panel's 16 rows)."""

    code: int
    group: int
    record: int


Q4_F16 = Format(0, 32, 320)  # 4-bit codes, float16 d and m (q4_kernels.c)
Q4_F32 = Format(1, 32, 384)  # 4-bit codes, float32 d and m
Q5_F16 = Format(6, 32, 384)  # 5-bit codes (a fifth-bit plane beside the nibbles), float16 d and m
Q5_F32 = Format(7, 32, 448)  # 5-bit codes, float32 d and m
FORMATS = {f.code: f for f in (Q4_F16, Q4_F32, Q5_F16, Q5_F32,
                               *(Format(2 + 2 * (group == 16) + biased, group, 16 * group + 64 * (1 + biased))
                                 for group in (32, 16) for biased in (0, 1)))}  # int8 codes (int8_kernels.c)


def int8_format(group: int, biased: bool) -> Format:
    """The int8_kernels.c layout for groups of `group` (16 or 32) inputs, with or without biases."""
    if group not in (16, 32):
        raise ValueError(f"int8 panels have groups of 16 or 32 inputs, got {group}")
    return FORMATS[2 + 2 * (group == 16) + int(biased)]


class Linear(ctypes.Structure):
    """cpu_layer.c's `struct linear`: a packed weight and its format number."""
    _fields_ = [("panels", ctypes.c_void_p), ("format", ctypes.c_int64)]


class Layer(ctypes.Structure):
    """cpu_layer.c's `struct layer`: one decoder layer's weights and KV cache."""
    _fields_ = ([(name, ctypes.c_void_p) for name in ("in_norm", "post_norm")]
                + [(name, Linear) for name in ("qkv", "o", "gate_up", "down")]
                + [(name, ctypes.c_void_p) for name in ("k_cache", "v_cache")])


class Step(ctypes.Structure):
    """cpu_layer.c's `struct step`: one decode step's shapes, positions and block tables."""
    _fields_ = ([(name, ctypes.c_int64) for name in ("rows", "hidden", "heads", "kv_heads", "head_dim", "inter",
                                                      "block_size", "block_shift", "max_blocks")]
                + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]
                + [(name, ctypes.c_void_p) for name in ("cos", "sin", "slots", "lens", "blocks", "work")]
                + [("nthreads", ctypes.c_int)])


class Q4Kernel:
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.native_decode_work_floats.argtypes = [ctypes.POINTER(Step)]
        lib.native_decode_work_floats.restype = ctypes.c_int64
        lib.native_decode_layer.argtypes = [ctypes.POINTER(Step), ctypes.POINTER(Layer), ctypes.c_void_p,
                                            ctypes.c_void_p]
        lib.native_decode_layer.restype = ctypes.c_int
        lib.packed_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        lib.packed_matmul.restype = ctypes.c_int
        lib.q4_simd.restype = ctypes.c_int
        self.simd = lib.q4_simd()

    def matmul(self, x: torch.Tensor, panels: torch.Tensor, fmt: Format = Q4_F16) -> torch.Tensor:
        """x: float32 [M, K]; panels: uint8 [N / 16, K / fmt.group * fmt.record] in format `fmt` (pack_panels,
        pack_int8_panels) -> float32 [M, N]."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] % fmt.group:
            raise ValueError(f"packed matmul wants float32 [M, K] with K % {fmt.group} == 0, "
                             f"got {x.dtype} {tuple(x.shape)}")
        rows, cols = x.shape
        width = cols // fmt.group * fmt.record
        if panels.dtype != torch.uint8 or panels.dim() != 2 or panels.shape[1] != width or not panels.is_contiguous():
            raise ValueError(f"panels must be contiguous uint8 [N / {PANEL}, {width}], "
                             f"got {panels.dtype} {tuple(panels.shape)}")
        x = x.contiguous()
        y = torch.empty(rows, panels.shape[0] * PANEL, dtype=torch.float32)
        rc = self.lib.packed_matmul(fmt.code, x.data_ptr(), rows, cols, panels.data_ptr(), y.shape[1], y.data_ptr(),
                                    torch.get_num_threads())
        if rc == -2:
            raise ValueError(f"unknown packed format {fmt}")
        if rc:
            raise MemoryError("packed matmul: out of memory")
        return y


def nibble_format(scale_dtype, bits: int) -> Format:
    """q4_kernels.c's format for codes of `bits` (4 or 5) bits and float16 or float32 d and m."""
    float32 = np.dtype(scale_dtype) == np.float32
    return {(4, False): Q4_F16, (4, True): Q4_F32, (5, False): Q5_F16, (5, True): Q5_F32}[bits, float32]


def pack_panels(codes: np.ndarray, d: np.ndarray, m: np.ndarray, bits: int = 4) -> torch.Tensor:
    """q4_kernels.c's weight layout, uint8 [rows / 16, cols / 32 * record], from codes [rows, cols] in
    0..2^bits - 1 (bits 4 or 5) and d, m [rows, cols / 32] (w = d * q + m), float16 or float32: format
    nibble_format(d.dtype, bits)."""
    rows, cols = codes.shape
    if rows % PANEL or cols % 32 or bits not in (4, 5):
        raise ValueError(f"pack_panels needs rows % {PANEL} == 0, cols % 32 == 0 and 4 or 5 bits, "
                         f"got {rows} x {cols}, {bits} bits")
    d, m = np.asarray(d), np.asarray(m)
    if d.dtype != m.dtype or d.dtype not in (np.float16, np.float32):
        raise ValueError(f"pack_panels wants d and m both float16 or both float32, got {d.dtype} and {m.dtype}")
    panels, blocks = rows // PANEL, cols // 32
    q = codes.astype(np.uint32).reshape(panels, PANEL, blocks, 4, 8)  # [panel, row, block, chunk, nibble]
    lanes = ((q & 15) << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)  # [panel, row, block, chunk]
    parts = [np.ascontiguousarray(lanes.transpose(0, 2, 3, 1)).view(np.uint8).reshape(panels, blocks, 256)]
    if bits == 5:  # one 32-bit lane of fifth bits per row, bit k for input k
        fifth = ((q.reshape(panels, PANEL, blocks, 32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
        parts.append(_per_row(fifth.sum(-1, dtype=np.uint32).reshape(rows, blocks), panels, blocks))
    parts += [_per_row(d, panels, blocks), _per_row(m, panels, blocks)]
    return torch.from_numpy(np.concatenate(parts, axis=-1).reshape(panels, -1))


def pack_int8_panels(codes: np.ndarray, scales: np.ndarray,
                     biases: Optional[np.ndarray]) -> tuple[torch.Tensor, Format]:
    """int8_kernels.c's weight layout and its format, from int8 codes [rows, cols] and float32 scales (and
    biases, or None) [rows, cols / group] (w = scale * q + bias), group = 16 or 32."""
    rows, cols = codes.shape
    group = cols // scales.shape[1] if scales.ndim == 2 and scales.shape[1] else 0
    if rows % PANEL or scales.shape[0] != rows or group * scales.shape[1] != cols:
        raise ValueError(f"pack_int8_panels needs rows % {PANEL} == 0 and [rows, cols / group] scales, "
                         f"got codes {codes.shape} and scales {scales.shape}")
    fmt = int8_format(group, biases is not None)
    panels, groups = rows // PANEL, cols // group
    q = np.asarray(codes, dtype=np.int8).reshape(panels, PANEL, groups, group)
    code_bytes = np.ascontiguousarray(q.transpose(0, 2, 3, 1)).view(np.uint8).reshape(panels, groups, PANEL * group)
    parts = [code_bytes, _per_row(np.asarray(scales, dtype=np.float32), panels, groups)]
    if biases is not None:
        parts.append(_per_row(np.asarray(biases, dtype=np.float32), panels, groups))
    return torch.from_numpy(np.concatenate(parts, axis=-1).reshape(panels, -1)), fmt


def _per_row(values: np.ndarray, panels: int, groups: int) -> np.ndarray:
    """[rows, groups] -> the bytes of each record's 16 values: [panels, groups, 16 * itemsize]."""
    per_record = np.ascontiguousarray(values.reshape(panels, PANEL, groups).transpose(0, 2, 1))
    return per_record.view(np.uint8).reshape(panels, groups, -1)


def kernel() -> Optional[Q4Kernel]:
    """The vectorized native kernel, or None (after one warning) where it cannot be used."""
    global _kernel, _tried
    if not _tried:
        _tried = True
        _kernel = _load()
    return _kernel


def _load() -> Optional[Q4Kernel]:
    choice = os.environ.get(DISABLE_ENV, "")
    if choice == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.warning("native 4-bit kernel: %s is not x86-64; using torch's int4 kernel", platform.machine())
        return None
    try:
        lib = Q4Kernel(ctypes.CDLL(build(FLAGS + ISA_FLAGS.get(choice, []))))
    except (OSError, RuntimeError) as e:
        logger.warning("native 4-bit kernel unavailable (%s); using torch's int4 kernel", e)
        return None
    if not lib.simd:
        logger.warning("native 4-bit kernel: this CPU has neither AVX-512 nor AVX2+FMA; using torch's int4 kernel")
        return None
    return lib


def compiler() -> str:
    return os.environ.get("CC", "cc")


def build(flags: Optional[list[str]] = None) -> str:
    """Path of the compiled library (built now unless cached). Raises RuntimeError when it cannot be built."""
    flags = FLAGS if flags is None else flags
    cc = shutil.which(compiler())
    if cc is None:
        raise RuntimeError(f"no C compiler ({compiler()!r} not found)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    sources = []
    for path in SOURCES:
        with open(path, "rb") as f:
            sources.append(f.read())
    key = hashlib.sha256(b"\0".join([*sources, " ".join(flags + LIBS).encode(), cc.encode(), version.encode()])).hexdigest()
    path = cache_dir("native", f"q4_kernels-{key[:24]}.so")
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        result = subprocess.run([cc, *flags, *SOURCES, "-o", tmp, *LIBS], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # atomic: a concurrent process sees the whole library or none
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"building {SOURCES} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
