"""Bring old network definitions to the V2 form the graph reads, as Caffe's
``upgrade_proto.cpp`` does: V1 ``layers {}`` with enum types become ``layer {}`` with type
strings, and an ``input:`` header with ``input_shape``/``input_dim`` becomes an Input layer."""

from __future__ import annotations

from calibrator.caffe import caffe_pb2
from calibrator.errors import CalibratorError

# V1 enum name -> V2 type string (Caffe's UpgradeV1LayerType).
_V1_TYPES = {
    "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU",
    "SIGMOID": "Sigmoid", "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence", "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH", "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# V1 fields that are copied to the V2 layer under the same name.
_SHARED_FIELDS = ("name", "bottom", "top", "include", "exclude", "blobs", "loss_weight",
                  "propagate_down", "transform_param", "loss_param")


def _blob_shape_legacy(blob) -> None:
    """Give a blob stored with num/channels/height/width an explicit 4-D shape."""
    if not blob.HasField("shape") and any(
            blob.HasField(f) for f in ("num", "channels", "height", "width")):
        blob.shape.dim.extend([blob.num, blob.channels, blob.height, blob.width])


def upgrade_v1_layer(v1, source: str = "") -> caffe_pb2.LayerParameter:
    layer = caffe_pb2.LayerParameter()
    type_name = caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)
    if type_name not in _V1_TYPES:
        raise CalibratorError(f"{source}: V1 layer '{v1.name}' has type {type_name}, "
                              "which has no V2 equivalent")
    layer.type = _V1_TYPES[type_name]
    v1_fields = {f.name for f, _ in v1.ListFields()}
    for name in _SHARED_FIELDS:
        if name not in v1_fields:
            continue
        field = v1.DESCRIPTOR.fields_by_name[name]
        if field.is_repeated:
            getattr(layer, name).extend(getattr(v1, name))
        elif field.message_type is not None:
            getattr(layer, name).CopyFrom(getattr(v1, name))
        else:
            setattr(layer, name, getattr(v1, name))
    for blob in layer.blobs:
        _blob_shape_legacy(blob)
    for i, param_name in enumerate(v1.param):
        _param_spec(layer, i).name = param_name
    for i, lr in enumerate(v1.blobs_lr):
        _param_spec(layer, i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        _param_spec(layer, i).decay_mult = decay
    # Every *_param message V1 carries has the same type and name in V2.
    for field, value in v1.ListFields():
        if field.name.endswith("_param") and field.name not in _SHARED_FIELDS \
                and field.name in layer.DESCRIPTOR.fields_by_name:
            getattr(layer, field.name).CopyFrom(value)
    return layer


def _param_spec(layer, index):
    while len(layer.param) <= index:
        layer.param.add()
    return layer.param[index]


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "") -> caffe_pb2.NetParameter:
    """Return ``net`` in V2 form (the message is modified in place and returned)."""
    if len(net.layers):
        if len(net.layer):
            raise CalibratorError(f"{source}: mixes V1 'layers' and V2 'layer' definitions")
        upgraded = [upgrade_v1_layer(v1, source) for v1 in net.layers]
        del net.layers[:]
        net.layer.extend(upgraded)
    else:
        for layer in net.layer:
            for blob in layer.blobs:
                _blob_shape_legacy(blob)
    if len(net.input):
        _upgrade_input_header(net, source)
    return net


def _upgrade_input_header(net, source: str) -> None:
    names = list(net.input)
    shapes = []
    if len(net.input_shape):
        if len(net.input_shape) != len(names):
            raise CalibratorError(f"{source}: {len(names)} 'input' names but "
                                  f"{len(net.input_shape)} 'input_shape' entries")
        shapes = [list(s.dim) for s in net.input_shape]
    elif len(net.input_dim):
        if len(net.input_dim) != 4 * len(names):
            raise CalibratorError(f"{source}: 'input_dim' needs 4 values per input, found "
                                  f"{len(net.input_dim)} for {len(names)} inputs")
        dims = list(net.input_dim)
        shapes = [dims[4 * i:4 * i + 4] for i in range(len(names))]
    else:
        raise CalibratorError(f"{source}: 'input' declared without 'input_shape' or 'input_dim'")
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    layer.top.extend(names)
    for dims in shapes:
        layer.input_param.shape.add().dim.extend(dims)
    existing = list(net.layer)
    del net.layer[:]
    net.layer.extend([layer] + existing)
    del net.input[:]
    del net.input_shape[:]
    del net.input_dim[:]
