"""Intel Caffe's compiled TEST net, and the two rules Intel's ``scripts/calibrator.py`` runs
on it after choosing the scales.

``caffe.compile_net`` (``python/caffe/_caffe.cpp``) returns ``Net::CompileNet`` of the raw
prototxt: no Split layers inserted, BatchNorm/Scale folded and ReLU fused into the
convolutions, an absorbed Eltwise (and its ReLU) merged into its convolution, which then reads
the residual as a second bottom and writes the Eltwise's (or ReLU's) top. Our fused view
(:mod:`calibrator.quant.fusion`) already made those decisions; :func:`compiled_layers` lists
the layers Intel's script then sees, by name, in layer order.

Both rules work on blob *names*, as the script does:

* ``force_fp32_opt`` (calibrator.py :450-487, skipped with ``-uff``): a quantized layer keeps
  an INT8 output only if some reader of its top has a type in ``int8_layers`` (Convolution,
  ReLU, Split, Concat, Pooling, Eltwise; InnerProduct too with ``-fc``) and no in-place
  (top == bottom) reader of another type comes first; the last Convolution (or InnerProduct
  with ``-fc``) of the net, quantized or not, always gets an FP32 output.
* ``cac_opt`` (calibrator.py :489-570, skipped with ``-ucac``): for each AVE pooling, the
  quantized layer above (through single-producer ``memory_layers``) and the quantized layer
  below (through single-reader ``memory_layers``) share a scale: the lower one's scale_in
  becomes the upper one's scale_out; when a multi-input Concat is met going up, the lower one
  takes the scale_in of the first quantized reader of that Concat instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibrator.graph.net import Node
from calibrator.quant.fusion import FusedGraph, FusedUnit

MEMORY_LAYERS = ("ReLU", "Split", "Concat", "Pooling", "Eltwise")


@dataclass(frozen=True)
class CompiledLayer:
    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    node: Node
    unit: FusedUnit | None = None


def compiled_layers(fused: FusedGraph) -> list[CompiledLayer]:
    """The TEST net's layers after Intel's ``CompileNet``, in order, as the script reads them."""
    out = []
    for node in fused.net.nodes:
        unit = fused.unit_of_node.get(node.index)
        if unit is None:
            out.append(CompiledLayer(node.name, node.type, tuple(node.bottoms), tuple(node.tops),
                                     node))
        elif node is unit.layer:
            bottoms = (unit.input.name,) + ((unit.residual.name,) if unit.residual else ())
            kind = "Convolution" if unit.kind == "conv" else "InnerProduct"
            out.append(CompiledLayer(unit.name, kind, bottoms, (unit.output.name,), node, unit))
    return out


def quantize_types(quantize_fc: bool) -> tuple[str, ...]:
    """calibrator.py's ``quantize_layers`` (``enable_fc_int8`` adds InnerProduct)."""
    return ("Convolution", "InnerProduct") if quantize_fc else ("Convolution",)


def force_fp32_outputs(layers: list[CompiledLayer], int8_out: set[str],
                       quantize_fc: bool) -> dict[str, str]:
    """``force_fp32_opt``: {layer: why} for the layers of ``int8_out`` (INT8 outputs now)
    that Intel's script gives an FP32 output."""
    quantize = quantize_types(quantize_fc)
    int8_types = quantize + MEMORY_LAYERS
    readers: dict[str, list[int]] = {}
    for index, layer in enumerate(layers):
        for bottom in layer.bottoms:
            readers.setdefault(bottom, []).append(index)
    indexes = [i for i, layer in enumerate(layers) if layer.type in quantize]
    if not indexes:
        return {}
    last = max(indexes)
    found = {}
    for index in indexes:
        layer = layers[index]
        if layer.name not in int8_out:
            continue
        force, why = True, "no reader of its output runs INT8 (Intel's force_fp32_opt)"
        for reader in readers.get(layer.tops[0], []):
            after = layers[reader]
            if after.tops == after.bottoms and after.type not in int8_types:
                force, why = True, (f"the in-place {after.type} '{after.name}' reads it "
                                    "(Intel's force_fp32_opt)")
                break
            if after.type in int8_types:
                force = False
        if index == last:
            force, why = True, "the last convolution of the net (Intel's force_fp32_opt)"
        if force:
            found[layer.name] = why
    return found


def _next_layers(layers: list[CompiledLayer], index: int) -> list[int]:
    found = []
    for i in range(index + 1, len(layers)):
        for top in layers[index].tops:
            if top in layers[i].bottoms:
                found.append(i)
    return found


def _previous_layers(layers: list[CompiledLayer], index: int) -> list[int]:
    found = []
    for i in range(index):
        for bottom in layers[index].bottoms:
            if bottom in layers[i].tops:
                found.append(i)
    return found


def _down(layers, index, quantize, int8_in) -> int | None:
    following = _next_layers(layers, index)
    if len(following) != 1:
        return None
    after = layers[following[0]]
    if after.type in quantize and after.name in int8_in:
        return following[0]
    if after.type in MEMORY_LAYERS:
        return _down(layers, following[0], quantize, int8_in)
    return None


def _up(layers, index, quantize, int8_in, int8_out) -> tuple[int | None, bool]:
    previous = _previous_layers(layers, index)
    if not previous:
        return None, False
    if len(previous) == 1:
        before = layers[previous[0]]
        if before.type in quantize and before.name in int8_out:
            return previous[0], False
        if before.type in MEMORY_LAYERS:
            return _up(layers, previous[0], quantize, int8_in, int8_out)
        return None, False
    if layers[index].type == "Concat":
        for reader in _next_layers(layers, index):
            if layers[reader].type in quantize and layers[reader].name in int8_in:
                return reader, True
    return None, layers[index].type == "Concat"


def average_pooling_pairs(layers: list[CompiledLayer], int8_in: set[str], int8_out: set[str],
                          quantize_fc: bool) -> list[tuple[str, str, bool, str]]:
    """``cac_opt``: (upper layer, lower layer, through a Concat, pooling) for each AVE pooling
    with a quantized layer on both sides; ``int8_in`` are the layers written with
    ``bw_layer_in: 8``, ``int8_out`` those with ``bw_layer_out: 8``."""
    quantize = quantize_types(quantize_fc)
    pairs = []
    for index, layer in enumerate(layers):
        if layer.type != "Pooling" or layer.unit is not None:
            continue
        param = layer.node.param.pooling_param
        if param.pool != type(param).AVE:
            continue
        up, has_concat = _up(layers, index, quantize, int8_in, int8_out)
        down = _down(layers, index, quantize, int8_in)
        if up is not None and down is not None:
            pairs.append((layers[up].name, layers[down].name, has_concat, layer.name))
    return pairs
