"""Building packed Linear layers the way the loader does, shared by the quantization tests."""

from photoninfer.quant.int4 import Int4Linear


def load_parts(layer, parts):
    """Load GGUF block parts into consecutive row slices of `layer` (as a fused q/k/v is filled), then pack it."""
    start = 0
    for part in parts:
        layer.weight.weight_loader(layer.weight, part, slice(start, start + part.shape[0]))
        start += part.shape[0]
    layer.process_weights_after_loading()
    return layer


def fused_int4_layer(parts, in_features: int) -> Int4Linear:
    """A fused Int4Linear (like q/k/v) from its GGUF block parts."""
    return load_parts(Int4Linear(in_features, sum(part.shape[0] for part in parts)), parts)
