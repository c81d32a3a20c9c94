"""Our native CPU kernels: built with the system C compiler on first use, cached, loaded with ctypes.
q4_kernels.c: the 4-bit matmul (float32, GGUF Q4_0/Q4_1 weights in panels); cpu_layer.c: a whole decoder layer
of a decode step on top of it (used by model/cpu_fast.py).

The shared library is cached under the PhotonInfer cache dir (native/), keyed by a hash of the sources, the
flags and the compiler's version, so it is built once per machine (a few seconds). No compiler, a failed build or a CPU that
is not x86-64 (or lacks AVX-512: the scalar path is slower than torch's kernel): `kernel()` returns None after
one warning, and callers keep torch's path.

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
from typing import Optional

import numpy as np
import torch

from photoninfer.config import cache_dir

logger = logging.getLogger(__name__)

SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), name) for name in ("q4_kernels.c", "cpu_layer.c")]
PANEL, RECORD = 16, 320  # rows of a panel, bytes of a panel's group of 32 inputs (q4_kernels.c)
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp"]
LIBS = ["-lm"]
DISABLE_ENV = "PHOTONINFER_NATIVE"  # "0" turns the native kernel off (torch's path is used)

_kernel: Optional["Q4Kernel"] = None
_tried = False


class Layer(ctypes.Structure):
    """cpu_layer.c's `struct layer`: one decoder layer's weights and KV cache."""
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("in_norm", "post_norm", "qkv", "o", "gate_up", "down", "k_cache", "v_cache")]


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
        lib.q4_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_int]
        lib.q4_matmul.restype = ctypes.c_int
        lib.q4_simd.restype = ctypes.c_int
        self.simd = lib.q4_simd()

    def matmul(self, x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
        """x: float32 [M, K]; panels: uint8 [N / 16, K / 32 * 320] from pack_panels -> float32 [M, N]."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] % 32:
            raise ValueError(f"q4_matmul wants float32 [M, K] with K % 32 == 0, got {x.dtype} {tuple(x.shape)}")
        rows, cols = x.shape
        if (panels.dtype != torch.uint8 or panels.dim() != 2 or panels.shape[1] != cols // 32 * RECORD
                or not panels.is_contiguous()):
            raise ValueError(f"panels must be contiguous uint8 [N / {PANEL}, {cols // 32 * RECORD}], "
                             f"got {panels.dtype} {tuple(panels.shape)}")
        x = x.contiguous()
        y = torch.empty(rows, panels.shape[0] * PANEL, dtype=torch.float32)
        if self.lib.q4_matmul(x.data_ptr(), rows, cols, panels.data_ptr(), y.shape[1], y.data_ptr(),
                              torch.get_num_threads()):
            raise MemoryError("q4_matmul: out of memory")
        return y


def pack_panels(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> torch.Tensor:
    """The kernel's weight layout (see q4_kernels.c), uint8 [rows / 16, cols / 32 * 320], from codes
    [rows, cols] in 0..15 and float16 d, m [rows, cols / 32] (w = d * q + m)."""
    rows, cols = codes.shape
    if rows % PANEL or cols % 32:
        raise ValueError(f"pack_panels needs rows % {PANEL} == 0 and cols % 32 == 0, got {rows} x {cols}")
    panels, blocks = rows // PANEL, cols // 32
    q = codes.astype(np.uint32).reshape(panels, PANEL, blocks, 4, 8)  # [panel, row, block, chunk, nibble]
    lanes = (q << (4 * np.arange(8, dtype=np.uint32))).sum(-1, dtype=np.uint32)  # [panel, row, block, chunk]
    code_bytes = np.ascontiguousarray(lanes.transpose(0, 2, 3, 1)).view(np.uint8).reshape(panels, blocks, 256)
    scales = [np.ascontiguousarray(np.asarray(a, dtype=np.float16).reshape(panels, PANEL, blocks).transpose(0, 2, 1))
              .view(np.uint8).reshape(panels, blocks, 32) for a in (d, m)]
    return torch.from_numpy(np.concatenate([code_bytes, *scales], axis=-1).reshape(panels, blocks * RECORD))


def kernel() -> Optional[Q4Kernel]:
    """The vectorized native kernel, or None (after one warning) where it cannot be used."""
    global _kernel, _tried
    if not _tried:
        _tried = True
        _kernel = _load()
    return _kernel


def _load() -> Optional[Q4Kernel]:
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.warning("native 4-bit kernel: %s is not x86-64; using torch's int4 kernel", platform.machine())
        return None
    try:
        lib = Q4Kernel(ctypes.CDLL(build()))
    except (OSError, RuntimeError) as e:
        logger.warning("native 4-bit kernel unavailable (%s); using torch's int4 kernel", e)
        return None
    if not lib.simd:
        logger.warning("native 4-bit kernel: this CPU has no AVX-512; using torch's int4 kernel")
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
