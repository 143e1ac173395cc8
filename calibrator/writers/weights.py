"""``weights`` (``--weights-out [FILE]``): the caffemodel carrying the bias correction.

The corrected bias goes where the net keeps its bias: the beta of a Scale layer folded after
the convolution (BatchNorm + Scale), else the convolution's own bias (divided by what the
folded layers multiply it by); a convolution without a bias gets one, and the quantized
prototxt then says ``bias_term: true`` for it. Every other blob is copied unchanged; the
FP32 caffemodel given with ``-w`` is never modified."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.writers.base import OutputContext, Writer


def default_weights_path(weights: str | Path) -> Path:
    """``<weights>_int8.caffemodel`` beside the FP32 weights."""
    weights = Path(weights)
    stem = weights.name[:-len(weights.suffix)] if weights.suffix else weights.name
    return weights.with_name(f"{stem}_int8.caffemodel")


def _shift_target(unit) -> tuple[str, np.ndarray | None]:
    """(layer that takes the shift, per-channel divisor for the conv's bias or None)."""
    last = unit.folded[-1] if unit.folded else None
    if last is not None and last.type == "Scale" and last.module.bias_term:
        return last.name, None
    divisor = np.ones(unit.layer.module.weight_bias()[0].shape[0], np.float64)
    for node in unit.folded:
        multiplier, _ = node.module.channel_affine()
        divisor = divisor * multiplier.detach().double().cpu().numpy()
    return unit.layer.name, divisor


def needs_bias_term(fused, plan) -> list[str]:
    """Layers whose corrected bias is a new bias blob (their prototxt needs bias_term)."""
    names = []
    for unit in fused.units:
        lq = plan.layers.get(unit.name)
        if lq is None or lq.bias_shift is None:
            continue
        target, _ = _shift_target(unit)
        if target == unit.layer.name and unit.layer.module.weight_bias()[1] is None:
            names.append(unit.layer.name)
    return names


def corrected_weights(weights: dict, fused, plan) -> dict:
    """A copy of ``weights`` (layer name -> blobs) with every INT8 layer's bias shift."""
    out = {name: [np.array(b, copy=True) for b in blobs] for name, blobs in weights.items()}
    for unit in fused.units:
        lq = plan.layers.get(unit.name)
        if lq is None or lq.bias_shift is None or unit.name in plan.excluded:
            continue
        shift = np.asarray(lq.bias_shift, np.float64)
        target, divisor = _shift_target(unit)
        blobs = out.setdefault(target, [])
        if divisor is None:                     # the Scale's beta
            index = 1
        else:                                   # the conv's own bias
            shift = np.where(divisor != 0, shift / np.where(divisor == 0, 1, divisor), 0.0)
            index = 1
            if len(blobs) < 2:
                blobs.append(np.zeros(len(shift), np.float32))
        blobs[index] = (blobs[index].astype(np.float64).reshape(-1) + shift).astype(
            np.float32).reshape(blobs[index].shape)
    return out


class WeightsWriter(Writer):
    name = "weights"
    option = "--weights-out"
    metavar = "FILE"
    optional_value = True
    help = ("write the caffemodel with bias correction (default <weights>_int8.caffemodel): "
            "the corrected biases reach the runtime only through it, so bias correction "
            "runs only with this option")

    def default_path(self, config) -> Path:
        return default_weights_path(config.weights)

    def write(self, path: Path, context: OutputContext) -> Path:
        model = context.model
        weights = corrected_weights(model.weights, context.fused, context.plan)
        return write_caffemodel(path, weights, with_bias_terms(model.net_param,
                                                               context.fused, context.plan))


def with_bias_terms(net_param, fused, plan):
    """A copy of ``net_param`` in which the layers given a corrected bias have bias_term."""
    names = set(needs_bias_term(fused, plan))
    out = type(net_param)()
    out.CopyFrom(net_param)
    for layer in out.layer:
        if layer.name in names:
            param = (layer.inner_product_param if layer.type == "InnerProduct"
                     else layer.convolution_param)
            param.bias_term = True
    return out
