"""Caffemodels saved from Intel Caffe's compiled net.

Intel's ``first_conv_force_u8.py`` (``-fu``) saves ``<weights>_new.caffemodel`` with
``net.save``: the layers of the *compiled* net, where ``RemoveBNScale``
(``src/caffe/layers/remove_batch_norm.cpp``) has folded every BatchNorm (+ Scale) into the
convolution before it, which gained a bias (``bias_term: true``). The prototxt that goes
with it (``_force_u8.prototxt``) still lists the BatchNorm/Scale layers: Intel removes them
again when it compiles the prototxt, and copies the folded blobs by name.

:func:`apply_compiled_weights` does the same on a TEST net before it is built: a
Convolution followed by a BatchNorm (and a Scale) that have no blobs in the caffemodel, while
the convolution has them (two, when the prototxt says ``bias_term: false``), loses those
layers; the convolution writes their top and takes the caffemodel's bias. Anything else is
left alone (a BatchNorm without blobs in any other place stays an error, as in Caffe)."""

from __future__ import annotations

from calibrator.caffe import caffe_pb2

CONV_TYPES = ("Convolution",)


def _readers(layers, start: int, name: str) -> list[int]:
    """Readers of the version of ``name`` current at ``start`` (up to its next writer)."""
    found = []
    for i in range(start, len(layers)):
        if name in layers[i].bottom:
            found.append(i)
        if name in layers[i].top:
            break
    return found


def apply_compiled_weights(test_param: caffe_pb2.NetParameter, weights: dict) -> list[str]:
    """Remove, in place, the BatchNorm/Scale layers the caffemodel ``weights`` already folded
    into their convolutions; the names of the convolutions changed."""
    layers = test_param.layer
    changed, drop = [], set()
    for index, conv in enumerate(layers):
        if conv.type not in CONV_TYPES or conv.name not in weights or len(conv.top) != 1:
            continue
        chain, top, position = [], conv.top[0], index + 1
        for kind in ("BatchNorm", "Scale"):
            readers = _readers(layers, position, top)
            if len(readers) != 1 or layers[readers[0]].type != kind:
                break
            layer = layers[readers[0]]
            if layer.name in weights or len(layer.bottom) != 1 or len(layer.top) != 1:
                break
            chain.append(readers[0])
            top, position = layer.top[0], readers[0] + 1
        if not chain or layers[chain[0]].type != "BatchNorm":
            continue
        if len(weights[conv.name]) != 2:
            continue
        conv.convolution_param.bias_term = True
        conv.top[0] = layers[chain[-1]].top[0]
        drop.update(chain)
        changed.append(conv.name)
    if drop:
        kept = [layer for i, layer in enumerate(layers) if i not in drop]
        del test_param.layer[:]
        test_param.layer.extend(kept)
    return changed
