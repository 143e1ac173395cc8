"""Binary caffemodel files: learned blobs keyed by layer name.

Weights are matched to layers by name, never by position: a caffemodel is often a training
snapshot with data, split and loss layers the test prototxt does not have."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from calibrator.caffe import caffe_pb2
from calibrator.caffe.upgrade import upgrade_net
from calibrator.errors import CalibratorError, shorten
from calibrator.fileio import atomic_write, read_bytes

Weights = "OrderedDict[str, list[np.ndarray]]"


def blob_to_array(blob) -> np.ndarray:
    """A BlobProto as a float32 array of its declared shape (V1 num/channels/height/width
    blobs were given an explicit shape by the upgrade)."""
    if len(blob.double_data):
        values = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
    else:
        values = np.array(blob.data, dtype=np.float32)
    shape = tuple(int(d) for d in blob.shape.dim)
    if any(d < 0 for d in shape) or math.prod(shape) != values.size:
        raise ValueError(f"shape {shape} does not hold {values.size} values")
    return values.reshape(shape)


def array_to_blob(array: np.ndarray, blob) -> None:
    array = np.asarray(array, dtype=np.float32)
    blob.shape.dim.extend(int(d) for d in array.shape)
    blob.data.extend(array.ravel())


def parse_caffemodel(data: bytes, source: str) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise CalibratorError(f"{source}: not a binary caffemodel ({exc})") from None
    return upgrade_net(net, source=source)


def read_caffemodel(path: str | os.PathLike) -> "OrderedDict[str, list[np.ndarray]]":
    """Learned blobs of every layer that has any, keyed by layer name."""
    net = parse_caffemodel(read_bytes(path, "caffemodel"), str(path))
    weights: OrderedDict[str, list[np.ndarray]] = OrderedDict()
    for layer in net.layer:
        if not len(layer.blobs):
            continue
        if layer.name in weights:
            raise CalibratorError(f"{shorten(path)}: two layers named '{shorten(layer.name)}' "
                                  "carry weights")
        try:
            weights[layer.name] = [blob_to_array(b) for b in layer.blobs]
        except ValueError as exc:
            raise CalibratorError(f"{shorten(path)}: layer '{shorten(layer.name)}': "
                                  f"{shorten(exc)}") from None
    if not weights and len(net.layer) == 0:
        raise CalibratorError(f"{path}: caffemodel holds no layers")
    return weights


def weights_to_net(weights, net_param=None) -> caffe_pb2.NetParameter:
    """A NetParameter carrying ``weights``. Given the net, every layer of ``net_param`` is
    written in full (bottom, top, parameters), as Caffe's ``Net::ToProto`` writes snapshots:
    Intel Caffe compiles a caffemodel's own layers when it loads one (``CopyTrainedLayersFrom``
    folds BatchNorm there), and aborts on layers without tops or with a wrong ``bias_term``.
    Without the net, layers carry their name and blobs only, in the order of ``weights``."""
    out = caffe_pb2.NetParameter()
    if net_param is None:
        for name in weights:
            layer = out.layer.add(name=name)
            for array in weights[name]:
                array_to_blob(array, layer.blobs.add())
        return out
    out.name = net_param.name
    names = {layer.name for layer in net_param.layer}
    missing = [n for n in weights if n not in names]
    if missing:
        raise CalibratorError(f"weights for layers not in the net: {', '.join(missing)}")
    written = set()
    for source in net_param.layer:
        layer = out.layer.add()
        layer.CopyFrom(source)
        layer.ClearField("blobs")
        if layer.HasField("pooling_param"):
            # 13 is BVLC's round_mode here and avg_include_pad in Intel Caffe (PROTO.md)
            layer.pooling_param.ClearField("round_mode")
        if source.name in weights and source.name not in written:
            written.add(source.name)
            for array in weights[source.name]:
                array_to_blob(array, layer.blobs.add())
    return out


def write_caffemodel(path: str | os.PathLike, weights, net_param=None) -> Path:
    """Write ``weights`` (layer name -> list of arrays) as a binary caffemodel, atomically."""
    return atomic_write(path, weights_to_net(weights, net_param).SerializeToString())
