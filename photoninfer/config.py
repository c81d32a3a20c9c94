"""Frozen configuration dataclasses shared by the loader, the engine and the runner."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from photoninfer.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("llama", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only transformer, independent of where it was loaded from.

    `architecture` is "llama" (Llama-3.x, SmolLM2) or "qwen3" (adds per-head q/k RMSNorm).
    `rope_scaling` is None or the HF dict, e.g. {"rope_type": "llama3", "factor": 32.0, ...}.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def cache_dir(*parts: str) -> str:
    """PhotonInfer's own cache ($PHOTONINFER_CACHE, else ~/.cache/photoninfer), joined with `parts`."""
    root = os.environ.get("PHOTONINFER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "photoninfer"))
    return os.path.join(root, *parts)


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): only then are bf16 activations and
    the packed 4-bit kernels fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
            "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags())
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" means float32 on the CPU (the residual stream, attention and logits; see packs_weights for the
    matmuls) and bfloat16 on a GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[name]


KV_CACHE_DTYPES = ("auto", "fp8")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """"auto" keeps K/V in the model's dtype; "fp8" stores them as float8_e4m3fn (unscaled, saturating at
    +-448, as vLLM's default fp8 cache): half the bytes of bf16, so twice the tokens fit and decode
    attention reads half as much. Attention itself still computes in the model dtype."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ConfigError(f"unknown kv_cache_dtype {name!r}; use {' or '.join(KV_CACHE_DTYPES)}")


def packs_weights(dtype_name: str, device: torch.device) -> bool:
    """Whether GGUF 4-bit layers run packed (photoninfer.quant, the CPU fast path): on a CPU with native
    bf16 for dtype "auto" (float32 everywhere else: the quality of the float32 reference within 1% top-1)
    and "bfloat16" (bf16 everywhere: faster, less exact); on other CPUs for "auto" where our native 4-bit
    kernel runs (AVX2: every packed layer through it for every step, see cpu_dense_dtype). dtype "float32" is
    the exact reference path."""
    if device.type != "cpu" or dtype_name not in ("auto", "bfloat16", "bf16"):
        return False
    if cpu_has_native_bf16():
        return True
    from photoninfer.quant import native  # (it imports this module)

    return dtype_name == "auto" and native.kernel() is not None


def cpu_dense_dtype() -> torch.dtype:
    """The dtype of the CPU fast path's dense weight copies (steps of many tokens, the LM head's many rows):
    bf16 where the CPU computes it natively; else float32 (oneDNN has no bf16 there, and torch's emulated
    bf16 matmul is ~4x slower than its float32 one)."""
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def physical_cpu_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's units, so matmuls gain little
    from them)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as pkg, open(f"{topology}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def set_cpu_threads(threads: Optional[int]) -> int:
    """Use `threads` intra-op threads for CPU compute (None: one per physical core); returns the number."""
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    count = threads or physical_cpu_cores()
    torch.set_num_threads(count)
    return count


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is visible")
    return device


@dataclass
class EngineConfig:
    """Everything the engine needs besides the request stream. CLI flags map 1:1 onto these fields."""

    model: Optional[str] = None  # HF directory or .gguf file; None = the bundled SmolLM2 default
    tokenizer: Optional[str] = None  # defaults to the model path
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"  # "fp8": K/V stored as float8_e4m3fn (resolve_kv_cache_dtype)
    device: str = "auto"
    quantization: Optional[str] = None  # seam for the quantization issue
    block_size: int = 16
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None  # tokens per step; None = 8192 on CUDA, 2048 on the CPU
    max_model_len: Optional[int] = None  # defaults to the model's max_position_embeddings
    num_kv_blocks: Optional[int] = None  # overrides the memory-based sizing below
    kv_cache_memory_gb: float = 1.0  # CPU: how much RAM the paged KV cache may take
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the card the engine may take
    threads: Optional[int] = None  # CPU: intra-op threads; None = one per physical core
    seed: int = 0
    enforce_eager: bool = False  # CUDA: run every step eagerly (no CUDA graphs), as vLLM's flag
    # prepare and postprocess on the host while the device computes; None = on for CUDA, off on the CPU
    async_scheduling: Optional[bool] = None
    extra: dict = field(default_factory=dict)

    def for_device(self, device: torch.device) -> "EngineConfig":
        """The defaults that depend on the device filled in. A GPU prefills in larger steps: 8192 tokens
        keep its tensor cores busy (measured: the nano-vllm workload runs 12% faster than with 2048), while
        a CPU step of 2048 tokens already takes long enough to delay the running requests' next tokens."""
        if self.max_num_batched_tokens is not None:
            return self
        return replace(self, max_num_batched_tokens=8192 if device.type == "cuda" else 2048)

    def validate(self) -> None:
        positive = {
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": 1 if self.max_num_batched_tokens is None else self.max_num_batched_tokens,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ConfigError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise ConfigError(f"threads must be a positive integer, got {self.threads!r}")
        resolve_kv_cache_dtype(self.kv_cache_dtype, torch.float32)  # the one list of accepted names
        if self.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
