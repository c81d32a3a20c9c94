"""Write a copy of a GGUF (default: the bundled SmolLM2 Q4_1) with its decoder projections re-quantized to
another GGML type, to benchmark and test the packed formats on a real model's shapes and weights:

    python scripts/requantize_gguf.py OUT.gguf --type Q8_0|Q5_0|Q5_1|Q6_K|Q5_K|Q4_K|Q4_K_M [--model IN.gguf]

The weights are the source's dequantized ones (so a Q4_1 source gives a Q6_K file no better than Q4_1: fine for
speed, and each file is its own float32 reference). Q8_0, Q5_0, Q5_1 are the `gguf` package's quantizers; the
K-quants (which it cannot quantize) are simple round-to-nearest quantizers written here, checked against its
dequantize. Q4_K_M: Q4_K with attn_v and ffn_down in Q6_K (llama.cpp's Q4_K_M does that for half of them).
As llama.cpp does, a K-quant tensor whose inputs are not a multiple of 256 (SmolLM2: hidden 576) falls back
to Q5_0 (for Q4_K), Q5_1 (Q5_K) or Q8_0 (Q6_K). Everything else (embeddings, norms, metadata, tokenizer) is
copied unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _round_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, np.round(a / b), 0.0)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> Q6_K blocks uint8 [rows, cols / 256 * 210]: q in -32..31 per 16, int8 scales."""
    rows = w.shape[0]
    x = w.reshape(-1, 16, 16).astype(np.float32)
    n = len(x)
    s = np.abs(x).max(-1) / 31
    d = (s.max(-1) / 127).astype(np.float16)
    sc = _round_div(s, d.astype(np.float32)[:, None]).clip(-128, 127).astype(np.int8)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    q = (_round_div(x, step[..., None]).clip(-32, 31).astype(np.int32) + 32).reshape(n, 256)
    low, high = (q & 15).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    blocks = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8),
                             d.reshape(n, 1).view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def quantize_k(w: np.ndarray, bits: int) -> np.ndarray:
    """float32 [rows, cols] -> Q4_K (bits 4) or Q5_K (bits 5) blocks: per 32, w = d * sc * q - dmin * mn with
    6-bit sc and mn, q in 0..2^bits - 1."""
    rows, levels = w.shape[0], (1 << bits) - 1
    x = w.reshape(-1, 8, 32).astype(np.float32)
    n = len(x)
    low, high = np.minimum(x.min(-1), 0), x.max(-1)
    d = ((high - low).max(-1) / levels / 63).astype(np.float16)
    dmin = ((-low).max(-1) / 63).astype(np.float16)
    sc = _round_div((high - low) / levels, d.astype(np.float32)[:, None]).clip(0, 63).astype(np.uint8)
    mn = _round_div(-low, dmin.astype(np.float32)[:, None]).clip(0, 63).astype(np.uint8)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    offset = dmin.astype(np.float32)[:, None] * mn.astype(np.float32)
    q = _round_div(x + offset[..., None], step[..., None]).clip(0, levels).astype(np.uint8)  # [n, 8, 32]
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    pairs = (q & 15).reshape(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    parts = [d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), scales]
    if bits == 5:
        fifth = (q >> 4).reshape(n, 8, 32)
        parts.append(sum(fifth[:, b].astype(np.uint8) << b for b in range(8)).astype(np.uint8))
    return np.concatenate([*parts, qs], axis=1).reshape(rows, -1)


def quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    import gguf

    if type_name in ("Q8_0", "Q5_0", "Q5_1"):
        return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])
    if type_name == "Q6_K":
        return quantize_q6_k(w)
    return quantize_k(w, {"Q4_K": 4, "Q5_K": 5}[type_name])


FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's, for inputs not a multiple of 256


def target_type(tensor_name: str, cols: int, mode: str) -> str | None:
    part = tensor_name.split(".")[-2] if tensor_name.startswith("blk.") else None
    if part not in PROJECTIONS:
        return None
    qtype = ("Q6_K" if part in ("attn_v", "ffn_down") else "Q4_K") if mode == "Q4_K_M" else mode
    return FALLBACK[qtype] if qtype in FALLBACK and cols % 256 else qtype


def requantize(src: str, out: str, mode: str) -> None:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    worst, counts = {}, {}
    for t in reader.tensors:
        qtype = target_type(t.name, int(t.shape[0]), mode)  # GGUF shapes list the inputs first
        if qtype is None:
            writer.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
            continue
        weight = dequantize(np.array(t.data), t.tensor_type).astype(np.float32)  # [rows, cols]
        blocks = quantize(weight, qtype)
        back = dequantize(blocks, gguf.GGMLQuantizationType[qtype])
        error = float(np.abs(back - weight).max() / np.abs(weight).max())
        worst[qtype] = max(worst.get(qtype, 0.0), error)
        counts[qtype] = counts.get(qtype, 0) + 1
        writer.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for qtype, error in worst.items():
        print(f"{qtype}: {counts[qtype]} tensors, max |requantized - source| / max |source|: {error:.4f}")


def main() -> None:
    from photoninfer.model.loader import default_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--type", required=True, choices=("Q8_0", "Q5_0", "Q5_1", "Q6_K", "Q5_K", "Q4_K", "Q4_K_M"))
    parser.add_argument("--model", default=None, help="source GGUF (default: the bundled SmolLM2 Q4_1)")
    args = parser.parse_args()
    requantize(args.model or default_model_path(), args.out, args.type)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
