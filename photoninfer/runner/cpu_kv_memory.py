"""Memory for the CPU KV cache: zeros that cost nothing at start-up, and pages faulted in before they are needed.

numpy's zeros is calloc: a large buffer gets fresh pages that the OS maps, already zero, at first write
instead of torch.zeros writing 1 GiB of zeros at start-up (0.5 s). But a fresh page costs its first writer
the kernel's zeroing: on the 2-core Xeon ~2.4 ms per MiB, so the first batch of 16 prompts spent ~0.2 s
faulting in the blocks it wrote. `prefault_in_background` asks the kernel to populate the pages from a
background thread (MADV_POPULATE_WRITE: maps writable pages without changing their contents, so it is safe
while the engine writes K/V), in the order the block manager hands blocks out (lowest ids first), for the
first PREFAULT_BYTES.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import threading
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)

PAGE = 4096
MADV_POPULATE_WRITE = 23  # Linux 5.14+
BLOCKS_PER_CHUNK = 16
# Only the blocks handed out first: enough for a few thousand tokens of a small model (SmolLM2: 178 blocks,
# 2,800 tokens) at ~0.3 s of one core, without committing a whole 1 GiB cache (or a test's many caches).
PREFAULT_BYTES = 128 << 20


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros whose pages the OS maps only when first touched (calloc). The tensor shares the
    numpy array's memory and keeps it alive."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = np.zeros((nbytes + 64,), dtype=np.uint8)
    start = -raw.ctypes.data % 64  # 64-byte aligned, as torch's own allocations are (AVX-512 loads)
    return torch.from_numpy(raw[start:start + nbytes]).view(dtype).view(shape)


def _populate(address: int, nbytes: int, madvise) -> bool:
    first = address // PAGE * PAGE
    return madvise(ctypes.c_void_p(first), ctypes.c_size_t(address + nbytes - first),
                   ctypes.c_int(MADV_POPULATE_WRITE)) == 0


def prefault_in_background(caches: list[torch.Tensor], max_bytes: int = PREFAULT_BYTES) -> threading.Thread | None:
    """Fault in the pages of the lowest blocks of per-layer caches [2, num_blocks, ...] (K, then V), up to
    `max_bytes` in all, a few blocks of every layer at a time. Returns the daemon thread, or None where
    madvise is unavailable."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None

    stop = threading.Event()

    def run() -> None:
        start = time.perf_counter()
        block_bytes = sum(cache[0, 0].numel() * cache.element_size() * 2 for cache in caches)
        num_blocks = min(caches[0].shape[1], max(1, max_bytes // block_bytes))
        for first in range(0, num_blocks, BLOCKS_PER_CHUNK):
            for cache in caches:
                for part in cache:  # K, V
                    if stop.is_set():
                        return
                    chunk = part[first:min(first + BLOCKS_PER_CHUNK, num_blocks)]
                    if not _populate(chunk.data_ptr(), chunk.numel() * chunk.element_size(), madvise):
                        logger.debug("MADV_POPULATE_WRITE refused (errno %d): pages fault in as written",
                                     ctypes.get_errno())
                        return
        logger.debug("KV cache pages faulted in, %.1f s", time.perf_counter() - start)

    def finish() -> None:  # a daemon thread inside a foreign call at interpreter exit aborts the process
        stop.set()
        thread.join()

    thread = threading.Thread(target=run, name="kv-cache-prefault", daemon=True)
    thread.start()
    atexit.register(finish)
    return thread
