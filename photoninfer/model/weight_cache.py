"""On-disk cache of what is slow to rebuild from a GGUF: the parsed header (config, tensor types) and the
model's finished weights (dequantized or re-packed for one dtype/device), so a second start takes a second.

An entry is keyed by the file (absolute path, size, mtime, sha256 of its first MiB: the header) and by the
torch and gguf versions and FORMAT_VERSION, so any change to the file or to how weights are built misses
the cache. Only the newest MAX_ENTRIES entries are kept. A damaged entry is ignored and rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from typing import Optional

import torch

from photoninfer.config import ModelConfig, cache_dir, cpu_dense_dtype

logger = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump when the cached layout or the packing of any format changes
MAX_ENTRIES = 4
_HEADER_BYTES = 1 << 20


def entry_dir(path: str) -> str:
    from importlib.metadata import version  # the gguf package has no __version__ (and takes 0.15 s to import)

    stat = os.stat(path)
    with open(path, "rb") as f:
        header = hashlib.sha256(f.read(_HEADER_BYTES)).hexdigest()
    identity = "|".join(str(x) for x in (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, header,
                                        torch.__version__, version("gguf"), FORMAT_VERSION))
    return cache_dir("weights", hashlib.sha256(identity.encode()).hexdigest()[:24])


def load_header(path: str) -> Optional[dict]:
    """{"config": ModelConfig, "num_tensors": int, "tensor_types": {...}} cached for this GGUF, or None."""
    data = _load(os.path.join(entry_dir(path), "header.pt"))
    if data is None:
        return None
    try:
        return {**data, "config": ModelConfig(**data["config"])}
    except (TypeError, KeyError):
        return None


def save_header(path: str, config: ModelConfig, num_tensors: int, tensor_types: dict[str, str]) -> None:
    data = {"config": dataclasses.asdict(config), "num_tensors": num_tensors, "tensor_types": tensor_types}
    _save(data, os.path.join(entry_dir(path), "header.pt"))


def weights_file(path: str, dtype: torch.dtype, device: torch.device, pack: bool) -> str:
    from photoninfer.quant import native

    # packed layers hold the native kernel's layout where it is available here, torch's where not; on a CPU
    # without native bf16 they keep no dense bf16 copies (config.cpu_dense_dtype)
    packing = ("-packed-native" if native.kernel() is not None else "-packed") if pack else ""
    packing += "-dense-float32" if pack and cpu_dense_dtype() == torch.float32 else ""
    variant = f"{str(dtype).removeprefix('torch.')}-{device.type}{packing}"
    return os.path.join(entry_dir(path), f"weights-{variant}.pt")


def load_weights(path: str, dtype: torch.dtype, device: torch.device, pack: bool) -> Optional[dict[str, torch.Tensor]]:
    """The finished state dict (memory-mapped) for this GGUF, dtype, device and packing, or None."""
    return _load(weights_file(path, dtype, device, pack), mmap=True)


def save_weights(path: str, dtype: torch.dtype, device: torch.device, pack: bool,
                 state: dict[str, torch.Tensor]) -> None:
    _save({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, weights_file(path, dtype, device, pack))
    _prune()


def _load(file: str, mmap: bool = False):
    if not os.path.isfile(file):
        return None
    try:
        return torch.load(file, mmap=mmap, weights_only=True)
    except Exception as e:  # truncated or foreign file: rebuild it
        logger.warning("ignoring unreadable cache file %s: %s", file, e)
        return None


def _save(obj, file: str) -> None:
    """Write atomically (a concurrent loader never sees half a file); a read-only cache only costs time."""
    try:
        os.makedirs(os.path.dirname(file), exist_ok=True)
        tmp = f"{file}.tmp{os.getpid()}"
        torch.save(obj, tmp)
        os.replace(tmp, file)
        os.utime(os.path.dirname(file))  # entry age = last write, for pruning
    except OSError as e:
        logger.warning("could not write the weight cache %s: %s", file, e)


def _prune() -> None:
    root = cache_dir("weights")
    try:
        entries = sorted((os.path.join(root, e) for e in os.listdir(root)), key=os.path.getmtime, reverse=True)
    except OSError:
        return
    for old in entries[MAX_ENTRIES:]:
        shutil.rmtree(old, ignore_errors=True)
