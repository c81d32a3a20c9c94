"""A GGUF tensor kept in its quantized blocks, and the decoders that turn them into (codes, scales, biases).

The loader yields a `GGUFBlocks` for every quantized GGUF tensor instead of dequantizing it, so a quantized
Linear can keep the weight packed; a dense Linear calls `.dequantize()`. Rows are the HF output rows, each row a
run of GGML blocks along the input dimension, so slicing or permuting rows (fused q/k/v, llama.cpp's rope
permutation) works on the raw bytes.

The 4-bit formats all decode to one affine form per group of 32 inputs: w = scale * q + bias with q in 0..15:
  Q4_0: w = d * (q - 8)            -> scale d,        bias -8 d
  Q4_1: w = d * q + m              -> scale d,        bias m
  Q4_K: w = d * sc * q - dmin * mn -> scale d * sc,   bias -dmin * mn   (8 groups of 32 per 256-block)
The others that run packed decode to int8 codes, a float32 scale per group and, but for Q8_0 and Q6_K, a bias:
  Q8_0: w = d * q,  q in -128..127                 (groups of 32)
  Q5_0: w = d * (q - 16) -> scale d, bias -16 d, q in 0..31   (groups of 32; the fifth bits in a 32-bit word)
  Q5_1: w = d * q + m,  q in 0..31                 (groups of 32)
  Q6_K: w = d * sc * q,  q in -32..31              (16 groups of 16 per 256-block; sc int8)
  Q5_K: w = d * sc * q - dmin * mn,  q in 0..31    (as Q4_K, with a fifth bit per code)
Every decoder computes scale and bias in float32 exactly as the `gguf` package's dequantize does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

GROUP_SIZE = 32  # every 4-bit GGUF format has one scale (and bias) per 32 inputs


@dataclass
class GGUFBlocks:
    """Raw GGML blocks of a [rows, cols] weight: `data` is uint8 [rows, bytes per row]."""

    type_name: str  # GGMLQuantizationType name, e.g. "Q4_1"
    shape: tuple[int, int]  # HF order: (out_features, in_features)
    data: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols], exactly as the `gguf` package decodes it (the reference every format meets)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        array = dequantize(self.data.numpy(), GGMLQuantizationType[self.type_name])
        return torch.from_numpy(np.ascontiguousarray(array)).reshape(self.shape)

    def with_data(self, data: torch.Tensor) -> "GGUFBlocks":
        """The same tensor with its rows reordered (data keeps its row count)."""
        return GGUFBlocks(self.type_name, self.shape, data.contiguous())


INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
PACKED_TYPES = INT4_TYPES + INT8_TYPES  # the types a packed Linear loads (int4.py, int8.py)


def decode_int4(blocks: GGUFBlocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K -> (codes uint8 [rows, cols] in 0..15, scales and biases float32 [rows, cols / 32])."""
    rows, cols = blocks.shape
    raw = blocks.data.numpy()
    decode = {"Q4_0": _decode_q4_0, "Q4_1": _decode_q4_1, "Q4_K": _decode_q4_k}[blocks.type_name]
    codes, scales, biases = decode(raw.reshape(rows, -1))
    return (torch.from_numpy(codes.reshape(rows, cols)),
            torch.from_numpy(scales.reshape(rows, cols // GROUP_SIZE).astype(np.float32)),
            torch.from_numpy(biases.reshape(rows, cols // GROUP_SIZE).astype(np.float32)))


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _decode_q4_0(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 18)  # d (f16), 16 bytes of codes
    d = _f16(blocks[..., 0:2])
    return _nibbles_32(blocks[..., 2:]), d, -8.0 * d


def _decode_q4_1(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 20)  # d (f16), m (f16), 16 bytes of codes
    return _nibbles_32(blocks[..., 4:]), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])


def _decode_q4_k(raw: np.ndarray):
    # d (f16), dmin (f16), 12 bytes of 6-bit (scale, min) pairs for 8 groups, 128 bytes of codes
    blocks = raw.reshape(raw.shape[0], -1, 144)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _q4_k_scales_mins(blocks[..., 4:16].astype(np.uint8))
    qs = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 32)  # 4 chunks of 32 bytes = 64 values each
    # in each chunk the low nibbles are group 2j, the high nibbles group 2j+1
    codes = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(*blocks.shape[:-1], 256)
    return codes, d[..., None] * sc, -dmin[..., None] * mn


def _q4_k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 bytes of a Q4_K/Q5_K block into 8 six-bit scales and 8 six-bit mins."""
    lo = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo[0] & 63, (lo[2] & 0x0F) | ((lo[0] >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo[1] & 63, (lo[2] >> 4) | ((lo[1] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def decode_int8(blocks: GGUFBlocks) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Any of PACKED_TYPES -> (codes int8 [rows, cols], scales float32 [rows, cols / group], biases like scales or
    None where the type has none), group = 16 (Q6_K) or 32, w = scale * q (+ bias) per group."""
    if blocks.type_name in INT4_TYPES:
        codes, scales, biases = decode_int4(blocks)
        return codes.view(torch.int8), scales, biases  # codes 0..15
    rows, cols = blocks.shape
    decode = {"Q8_0": _decode_q8_0, "Q5_0": _decode_q5_0, "Q5_1": _decode_q5_1, "Q5_K": _decode_q5_k,
              "Q6_K": _decode_q6_k}[blocks.type_name]
    codes, scales, biases = decode(blocks.data.numpy().reshape(rows, -1))
    groups = scales.size // rows
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(rows, groups))
    return (torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8).reshape(rows, cols)), as_tensor(scales),
            None if biases is None else as_tensor(biases))


def _decode_q8_0(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 34)  # d (f16), 32 int8 codes
    return blocks[..., 2:].view(np.int8), _f16(blocks[..., 0:2]), None


def _five_bits_32(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """[..., 4] bytes of fifth bits (a little-endian word, bit i for element i) and [..., 16] bytes of nibbles ->
    [..., 32] codes 0..31."""
    word = np.ascontiguousarray(qh).view("<u4")  # [..., 1]
    fifth = ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
    return _nibbles_32(qs) | (fifth << 4)


def _decode_q5_0(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 22)  # d (f16), 4 bytes of fifth bits, 16 bytes of nibbles
    d = _f16(blocks[..., 0:2])
    return _five_bits_32(blocks[..., 2:6], blocks[..., 6:]), d, -16.0 * d


def _decode_q5_1(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 24)  # d (f16), m (f16), 4 bytes of fifth bits, 16 bytes of nibbles
    return _five_bits_32(blocks[..., 4:8], blocks[..., 8:]), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])


def _decode_q6_k(raw: np.ndarray):
    # 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d (f16)
    blocks = raw.reshape(raw.shape[0], -1, 210)
    lead = blocks.shape[:-1]
    low = blocks[..., :128].reshape(*lead, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    high = blocks[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    codes = ((low & 0x0F).reshape(*lead, 256) | ((high & 3).reshape(*lead, 256) << 4)).astype(np.int8) - 32
    scales = _f16(blocks[..., 208:210])[..., None] * blocks[..., 192:208].view(np.int8).astype(np.float32)
    return codes, scales, None


def _decode_q5_k(raw: np.ndarray):
    # d (f16), dmin (f16), 12 bytes of 6-bit (scale, min) pairs, 32 bytes of fifth bits, 128 bytes of nibbles
    blocks = raw.reshape(raw.shape[0], -1, 176)
    lead = blocks.shape[:-1]
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    sc, mn = _q4_k_scales_mins(blocks[..., 4:16].astype(np.uint8))
    low = blocks[..., 48:].reshape(*lead, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
    high = blocks[..., 16:48].reshape(*lead, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
    codes = (low & 0x0F).reshape(*lead, 256) | ((high & 1).reshape(*lead, 256) << 4)
    return codes, d[..., None] * sc, -(dmin[..., None] * mn)
