"""Building an Int4Linear the way the loader does, shared by the quantization tests."""

from photoninfer.quant.int4 import Int4Linear


def fused_int4_layer(parts, in_features: int) -> Int4Linear:
    """A fused layer (like q/k/v) whose GGUF block parts load into consecutive row slices, then packed."""
    layer = Int4Linear(in_features, sum(part.shape[0] for part in parts))
    start = 0
    for part in parts:
        layer.weight.weight_loader(layer.weight, part, slice(start, start + part.shape[0]))
        start += part.shape[0]
    layer.process_weights_after_loading()
    return layer
