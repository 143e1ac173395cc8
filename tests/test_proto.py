"""calibrator/caffe/caffe.proto: real files parse, and field numbers match the upstream wire format."""

import struct

import pytest
from google.protobuf import text_format, unknown_fields

from calibrator.caffe import caffe_pb2

CAFFEMODELS = {
    # path under shared/models -> number of floats the README documents (None: not documented)
    "mobilenet_v2/mobilenet_v2.caffemodel": 3_539_036,
    "res10_ssd/res10_300x300_ssd_iter_140000.caffemodel": None,
}


def unknown_paths(message, path="net"):
    """Dotted paths of every (sub)message that carries fields this schema does not know."""
    found = [path] if len(unknown_fields.UnknownFieldSet(message)) else []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        items = value if field.is_repeated else [value]
        for i, item in enumerate(items):
            found += unknown_paths(item, f"{path}.{field.name}[{i}]")
    return found


def f32(value):
    return struct.pack("<f", value)


# --- real files from ../shared ---------------------------------------------------------------

def test_shared_prototxts_parse(shared):
    paths = sorted((shared / "models").rglob("*.prototxt"))
    assert len(paths) >= 10, paths
    for path in paths:
        net = text_format.Merge(path.read_text(), caffe_pb2.NetParameter())
        assert len(net.layer) + len(net.layers) > 0, path


def test_shared_labelmap_parses(shared):
    path = shared / "data" / "faces-pseudo" / "labelmap.prototxt"
    label_map = text_format.Merge(path.read_text(), caffe_pb2.LabelMap())
    assert [(i.name, i.label, i.display_name) for i in label_map.item] == [
        ("none_of_the_above", 0, "background"), ("face", 1, "face")]


@pytest.mark.parametrize("relpath", sorted(CAFFEMODELS))
def test_shared_caffemodels_have_no_unknown_fields(shared, relpath):
    data = (shared / "models" / relpath).read_bytes()
    net = caffe_pb2.NetParameter.FromString(data)
    assert unknown_paths(net) == []
    assert net.ByteSize() == len(data)  # nothing dropped or reinterpreted
    floats = sum(len(b.data) for layer in net.layer for b in layer.blobs)
    assert floats > 0
    if CAFFEMODELS[relpath] is not None:
        assert floats == CAFFEMODELS[relpath]


# --- wire format against hand-encoded bytes ---------------------------------------------------

def test_quantization_param_serialises_to_intel_tags():
    layer = caffe_pb2.LayerParameter()
    q = layer.quantization_param
    q.bw_layer_in = 8
    q.scale_in.append(2.5)
    q.is_negative_input = True
    q.force_u8_input = True
    inner = (b"\x18\x08"                    # 3 << 3 | 0 = 24: bw_layer_in = 8
             + b"\xa5\x01" + f32(2.5)       # 20 << 3 | 5 = 165: scale_in (fixed32, unpacked)
             + b"\xb8\x01\x01"              # 23 << 3 | 0 = 184: is_negative_input = true
             + b"\xc0\x01\x01")             # 24 << 3 | 0 = 192: force_u8_input = true
    expected = b"\xf2\x09" + bytes([len(inner)]) + inner  # 158 << 3 | 2 = 1266 = varint f2 09
    assert layer.SerializeToString() == expected
    assert caffe_pb2.LayerParameter.FromString(expected) == layer


@pytest.mark.parametrize("tag, payload, field, check", [
    # 106 << 3 | 2 = 850 -> d2 06; num_output (1, varint) = 32
    (b"\xd2\x06", b"\x08\x20", "convolution_param", lambda p: p.num_output == 32),
    # 148 << 3 | 2 = 1186 -> a2 09; min (1, fixed32) = 0, max (2, fixed32) = 6
    (b"\xa2\x09", b"\x0d" + f32(0.0) + b"\x15" + f32(6.0), "clip_param",
     lambda p: p.HasField("min") and (p.min, p.max) == (0.0, 6.0)),
    # 147 << 3 | 2 = 1178 -> 9a 09; beta (1, fixed32) = 6
    (b"\x9a\x09", b"\x0d" + f32(6.0), "swish_param", lambda p: p.beta == 6.0),
    # 164 << 3 | 2 = 1314 -> a2 0a; group (1, varint) = 3
    (b"\xa2\x0a", b"\x08\x03", "shuffle_channel_param", lambda p: p.group == 3),
    # 200 << 3 | 2 = 1602 -> c2 0c; label_map_file (2, bytes) = "m"
    (b"\xc2\x0c", b"\x12\x01m", "annotated_data_param", lambda p: p.label_map_file == "m"),
    # 203 << 3 | 2 = 1626 -> da 0c; min_size (1, fixed32) = 30, offset (13 << 3 | 5 = 0x6d) = .25
    (b"\xda\x0c", b"\x0d" + f32(30.0) + b"\x6d" + f32(0.25), "prior_box_param",
     lambda p: list(p.min_size) == [30.0] and p.offset == 0.25),
    # 204 << 3 | 2 = 1634 -> e2 0c; num_classes (1) = 2, keep_top_k (7) = 200 (varint c8 01)
    (b"\xe2\x0c", b"\x08\x02\x38\xc8\x01", "detection_output_param",
     lambda p: (p.num_classes, p.keep_top_k) == (2, 200)),
    # 206 << 3 | 2 = 1650 -> f2 0c; channel_shared (3) = false
    (b"\xf2\x0c", b"\x18\x00", "norm_param",
     lambda p: p.HasField("channel_shared") and not p.channel_shared),
    # 121 << 3 | 2 = 970 -> ca 07; pool (1) = AVE, global_pooling (12) = true, round_mode (13) = FLOOR
    (b"\xca\x07", b"\x08\x01\x60\x01\x68\x01", "pooling_param",
     lambda p: (p.pool, p.global_pooling, p.round_mode) == (1, True, 1)),
])
def test_layer_fields_decode_from_hand_built_bytes(tag, payload, field, check):
    layer = caffe_pb2.LayerParameter.FromString(tag + bytes([len(payload)]) + payload)
    assert [f.name for f, _ in layer.ListFields()] == [field]
    assert unknown_paths(layer) == []
    assert check(getattr(layer, field))


def test_ssd_transform_fields_decode_from_hand_built_bytes():
    # resize_param (8 << 3 | 2 = 0x42) { height (3) = 300 (varint ac 02) }, crop_h (11) = 5
    data = b"\x42\x03\x18\xac\x02" + b"\x58\x05"
    t = caffe_pb2.TransformationParameter.FromString(data)
    assert (t.resize_param.height, t.crop_h) == (300, 5)
    assert t.SerializeToString() == data


# --- text format --------------------------------------------------------------------------------

INTEL_LAYER = """
layer {
  name: "res2a_branch2b" type: "Convolution" bottom: "a" top: "b"
  convolution_param { num_output: 64 kernel_size: 3 pad: 1 engine: MKLDNN relu: true }
  quantization_param {
    precision: DYNAMIC_FIXED_POINT rounding_scheme: NEAREST
    bw_layer_in: 8 bw_layer_out: 8 bw_params: 8
    scale_in: 39.5 scale_out: 12.1 scale_params: 101.0 scale_params: 80.5
    is_negative_input: true
  }
  engine: "MKLDNN"
}
"""


def test_intel_quantized_layer_text_round_trips():
    net = text_format.Merge(INTEL_LAYER, caffe_pb2.NetParameter())
    layer = net.layer[0]
    q = layer.quantization_param
    assert (q.bw_layer_in, q.bw_layer_out, q.bw_params) == (8, 8, 8)
    assert q.precision == caffe_pb2.QuantizationParameter.DYNAMIC_FIXED_POINT
    assert list(q.scale_in) == [39.5] and list(q.scale_params) == [101.0, 80.5]
    assert abs(q.scale_out[0] - 12.1) < 1e-6
    assert q.is_negative_input and not q.force_u8_input
    assert layer.convolution_param.engine == caffe_pb2.ConvolutionParameter.MKLDNN
    assert layer.engine == "MKLDNN"
    again = text_format.Merge(text_format.MessageToString(net), caffe_pb2.NetParameter())
    assert again == net
    assert caffe_pb2.NetParameter.FromString(net.SerializeToString()) == net


def test_field_148_is_bvlc_clip_param():
    layer = text_format.Merge('type: "Clip" clip_param { min: 0 max: 6 }', caffe_pb2.LayerParameter())
    assert (layer.clip_param.min, layer.clip_param.max) == (0.0, 6.0)
    assert caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_number[148].name == "clip_param"
    with pytest.raises(text_format.ParseError):  # Intel's smooth_l1_loss_param has no field
        text_format.Merge("smooth_l1_loss_param { sigma: 3 }", caffe_pb2.LayerParameter())
