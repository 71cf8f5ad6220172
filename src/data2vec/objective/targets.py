"""data2vec targets: normalise each top-K teacher layer output, average, normalise again."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from data2vec.nn.layers import instance_norm_time, layer_norm_channels

LayerNorm = Literal["instance", "layer", "none"]


def _normalise(x: Tensor, kind: LayerNorm, padding_mask: Tensor | None) -> Tensor:
    if kind == "instance":
        return instance_norm_time(x, padding_mask)
    if kind == "layer":
        return layer_norm_channels(x)
    return x


def build_targets(layer_results: list[Tensor], top_k: int, layer_norm: LayerNorm = "instance",
                  final_norm: LayerNorm = "none",
                  padding_mask: Tensor | None = None) -> Tensor:
    """Average of the last `top_k` layer outputs (each (B, T, D)), each normalised first.

    layer_norm: per-layer norm — 'instance' (each channel over time, per example, padding
    excluded), 'layer' (parameter-free, over channels per step) or 'none'.
    final_norm: the same choices, applied to the average. Computed in fp32.

    The average is a running sum, one normalised layer at a time: stacking the K layers first
    (``torch.stack(...).mean(0)``) would allocate a (K, B, T, D) temporary, the largest tensor
    of the teacher's step at Base size.
    """
    if not 0 < top_k <= len(layer_results):
        raise ValueError(f"top_k={top_k} but {len(layer_results)} layer outputs were collected")
    target: Tensor | None = None
    for y in layer_results[-top_k:]:
        layer = _normalise(y.float(), layer_norm, padding_mask)
        if target is None:
            # with norm 'none' in fp32 this is the teacher's own tensor: never add into it
            target = layer.clone() if layer is y else layer
        else:
            target.add_(layer)
    assert target is not None
    target = target.div_(top_k) if top_k > 1 else target
    return _normalise(target, final_norm, padding_mask)
