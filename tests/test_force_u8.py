"""-fu / -clx: the first conv fed u8, as Intel's first_conv_force_u8.py writes it, and what
Intel Caffe then computes (the data transformer's pad with its off-by-one, the u8 input
reorder at scale 1.0, the corrected bias), against the numpy reference in
tests/intel_reference.py and against Intel's own numbers."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from calibrator.caffe import caffe_pb2
from calibrator.caffe.caffemodel import parse_caffemodel, read_caffemodel, write_caffemodel
from calibrator.caffe.prototxt import read_net
from calibrator.cli.main import main
from calibrator.data.options import ImageFolderOptions
from calibrator.model import load_model, quantized_plan
from calibrator.quant.force_u8 import new_first_bias, new_preprocessing
from calibrator.quant.simulate import Int8Simulator
from tests import intel_reference as ref
from tests.netutil import parse_net, random_weights
from tests.quant_helpers import conv_int64, intel_output, quantize_bias, quantize_weights
from tests.test_data import encoded_datum, write_lmdb

F = np.float32


def test_intel_numbers_scale_and_mean():
    # Intel's resnet50_int8_acc_clx_winograd.prototxt: TRAIN layer scale 0.0078125, means
    # 104/117/123; conv1 scale_in 107.655632019 -> its TEST layer's scale and mean_value
    scale, means = new_preprocessing(F(107.655632019), F(0.0078125), [104, 117, 123])
    assert F(scale) == F(0.841059625149)
    assert [F(m) for m in means] == [F(-48.1889724731), F(-35.1889724731), F(-29.1889724731)]


def test_bias_correction_is_128_over_s_in_times_the_weight_sum():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.1, (4, 3, 3, 3)).astype(F)
    bias = rng.normal(0, 0.1, 4).astype(F)
    got = new_first_bias(weight, bias, 50.0)
    want = bias.astype(np.float64) - 128 / 50.0 * weight.astype(np.float64).sum((1, 2, 3))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert got.dtype == np.float32


def test_data_transform_pad_border_and_off_by_one():
    """What Intel's own transformer gave (tools/intel_check, intel_transform): no crop, so
    the border is 0 -- left raw -- and row/column H - pad are normalized."""
    image = np.full((3, 3, 1), 200, np.uint8)
    got = ref.force_u8_data(image, [100.0], 0.5, 1)
    expected = np.array([[0, 0, 0, 0, 0],
                         [0, 50, 50, 50, -50],
                         [0, 50, 50, 50, -50],
                         [0, 50, 50, 50, -50],
                         [0, -50, -50, -50, -50]], F)
    np.testing.assert_array_equal(got[0], expected)
    # with a crop the border comes from the image around it: raw on the top/left, normalized
    # on the bottom/right (the off-by-one), 0 beyond the image
    image = np.arange(25, dtype=np.uint8).reshape(5, 5, 1) * 10
    got = ref.force_u8_data(image, [0.0], 0.5, 2, crop=3)    # crop rows/cols 1..3 of 5
    assert got.shape == (1, 7, 7)
    np.testing.assert_array_equal(got[0, 0], np.zeros(7))          # beyond the image: 0
    np.testing.assert_array_equal(got[0, 1, 1:6], image[0, :, 0])  # row 0 of the image, raw
    np.testing.assert_array_equal(got[0, 5, 2:6], np.rint(image[4, 1:5, 0] * F(0.5)))
    np.testing.assert_array_equal(got[0, 6], np.zeros(7))


NET = """name: "fu"
layer {{ name: "data" type: "{data_type}" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.0078125 mean_value: 104 mean_value: 117 mean_value: 123
                     crop_size: 12 }}
  {data_param} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 2 stride: 1 bias_term: false }} }}
layer {{ name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }}
layer {{ name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param {{ bias_term: true }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
  convolution_param {{ num_output: 4 kernel_size: 1 }} }}
layer {{ name: "pool" type: "Pooling" bottom: "conv3" top: "pool"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "pool" bottom: "label" top: "accuracy" }}
"""


def write_images(folder: Path, count=8, size=14, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(count):
        base = rng.integers(0, 256, 3)
        image = np.clip(base + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / "img" / f"{i}.png"), image)
        images.append(image)
    (folder / "list.txt").write_text("".join(f"{i}.png {i % 4}\n" for i in range(count)))
    return images


def make_net(folder: Path, data_type="ImageData", seed=1):
    images = write_images(folder)
    if data_type == "ImageData":
        param = (f'image_data_param {{ source: "{folder}/list.txt" root_folder: "{folder}/img/" '
                 'batch_size: 4 }')
    else:
        write_lmdb(folder / "db", {f"{i:08d}".encode(): encoded_datum(im, i % 4)
                                   for i, im in enumerate(images)})
        param = f'data_param {{ source: "{folder}/db" batch_size: 4 backend: LMDB }}'
    text = NET.format(data_type=data_type, data_param=param)
    prototxt = folder / "net.prototxt"
    prototxt.write_text(text)
    net = parse_net(text)
    weights = random_weights(net, {"data": (4, 3, 12, 12), "label": (4,)}, seed=seed)
    weights["conv1"][0] *= 3  # a first conv whose outputs are not tiny
    caffemodel = write_caffemodel(folder / "net.caffemodel", weights, net)
    return prototxt, caffemodel, images, weights


def fold(weights):
    w = weights["conv1"][0].astype(np.float64)
    mean, var, factor = (b.astype(np.float64) for b in weights["bn1"])
    f = 0 if factor[0] == 0 else 1 / factor[0]
    alpha = weights["scale1"][0] / np.sqrt(var * f + 1e-5)
    bias = weights["scale1"][1] - mean * f * alpha
    return (w * alpha.reshape(-1, 1, 1, 1)).astype(F), bias.astype(F)


def qparam(net, name):
    return next(l for l in net.layer if l.name == name).quantization_param


def reference_outputs(fu_net, new_weights, images):
    """Intel's integers for the first batch of the -fu files, numpy only."""
    data = next(l for l in fu_net.layer if l.name == "data").transform_param
    x = np.stack([ref.force_u8_data(im, list(data.mean_value), data.scale, data.pad,
                                    crop=data.crop_size) for im in images[:4]])
    blobs = {l.name: [np.asarray(b.data, F).reshape(tuple(b.shape.dim)) for b in l.blobs]
             for l in new_weights.layer if len(l.blobs)}
    def conv(name, q_in, pad, out_dtype):
        q = qparam(fu_net, name)
        w, b = blobs[name]
        scales = list(q.scale_params) * w.shape[0] if len(q.scale_params) == 1 \
            else list(q.scale_params)
        acc = conv_int64(q_in, quantize_weights(w, scales), pad=(pad, pad))
        return intel_output(acc, quantize_bias(b, q.scale_in[0], scales), q.scale_in[0],
                            scales, q.scale_out[0], out_dtype, slope=0.0 if out_dtype else None)

    q1, q2, q3 = (qparam(fu_net, n) for n in ("conv1", "conv2", "conv3"))
    q_in = ref.sat(np.rint(x), "u8").astype(np.int64)          # force_u8: reorder scale 1.0
    c1 = conv("conv1", q_in, 0, "u8")
    c2 = conv("conv2", ref.reorder(c1, q1.scale_out[0], q2.scale_in[0], "u8"), 1, "u8")
    assert q3.bw_layer_out == 32                        # the last conv: FP32 output
    c3 = conv("conv3", ref.reorder(c2, q2.scale_out[0], q3.scale_in[0], "u8"), 0, None)
    return {"data": x, "conv1": (c1, q1.scale_out[0]), "conv2": (c2, q2.scale_out[0]),
            "conv3": c3}


def simulated(prototxt, caffemodel, images=None):
    model = load_model(prototxt, caffemodel, images=images)
    fused, plan = quantized_plan(model.net)
    sim = Int8Simulator(fused, plan)
    feeds = model.source.batch(0)
    with torch.no_grad():
        out = model.net(feeds, outputs=["conv1", "conv2", "conv3"], overrides=sim.overrides)
    return feeds, {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("data_type", ["ImageData", "Data"])
def test_force_u8_files_and_integers(tmp_path, data_type):
    prototxt, caffemodel, images, weights = make_net(tmp_path, data_type)
    assert main(["-m", str(prototxt), "-w", str(caffemodel), "-1st", "-fu", "-q", "-s", "2",
                 "-a", "DIRECT", "--quiet"]) == 0
    quantized = read_net(tmp_path / "net_quantized.prototxt")
    fu_path, new_path = tmp_path / "net_quantized_force_u8.prototxt", tmp_path / "net_new.caffemodel"
    fu = read_net(fu_path)
    new = parse_caffemodel(new_path.read_bytes(), str(new_path))
    # the prototxt: Intel's changes and nothing else
    s8, u8 = qparam(quantized, "conv1"), qparam(fu, "conv1")
    assert s8.is_negative_input and not s8.force_u8_input
    assert u8.force_u8_input and not u8.HasField("is_negative_input")
    assert u8.scale_in[0] == s8.scale_in[0] and u8.scale_out[0] == s8.scale_out[0]
    assert list(u8.scale_params) == [F(s) * F(0.5) for s in s8.scale_params]
    conv1 = next(l for l in fu.layer if l.name == "conv1")
    assert list(conv1.convolution_param.pad) == [0]
    data = next(l for l in fu.layer if l.name == "data").transform_param
    assert data.pad == 2
    s_in = float(s8.scale_in[0])
    assert data.scale == F(s_in * F(0.0078125))
    assert list(data.mean_value) == [F(m - 128 / (s_in * float(F(0.0078125))))
                                     for m in (104, 117, 123)]
    for name in ("conv2", "conv3"):
        assert qparam(fu, name) == qparam(quantized, name)
    # the caffemodel: BatchNorm/Scale folded (Intel saves its compiled net), b'' on conv1
    layers = {l.name: l for l in new.layer}
    assert "bn1" not in layers and "scale1" not in layers
    assert layers["conv1"].convolution_param.bias_term and list(layers["conv1"].top) == ["conv1"]
    blobs = read_caffemodel(new_path)
    w_fold, b_fold = fold(weights)
    np.testing.assert_allclose(blobs["conv1"][0], w_fold, rtol=1e-5, atol=1e-6)
    expected_bias = b_fold - 128 / s_in * w_fold.astype(np.float64).sum((1, 2, 3))
    np.testing.assert_allclose(blobs["conv1"][1], expected_bias, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(blobs["conv2"][0], weights["conv2"][0])
    # what `calibrator test` runs on these files equals Intel's integers
    feeds, out = simulated(fu_path, new_path)
    want = reference_outputs(fu, new, images)
    np.testing.assert_array_equal(feeds["data"].numpy(), want["data"])
    for name in ("conv1", "conv2"):
        q, scale = want[name]
        np.testing.assert_array_equal(out[name], ref.dequantize(q, scale))
    np.testing.assert_array_equal(out["conv3"], want["conv3"])
    # the CLI runs them too
    assert main(["test", "-m", str(fu_path), "-w", str(new_path), "-i", "2", "--quiet"]) == 0


def test_clx_keeps_the_weight_scales(tmp_path):
    prototxt, caffemodel, _, _ = make_net(tmp_path)
    out = tmp_path / "clx.prototxt"
    assert main(["-m", str(prototxt), "-w", str(caffemodel), "-1st", "-fu", "--is_clx", "-q",
                 "-s", "2", "--quiet", "--output", str(out)]) == 0
    s8 = qparam(read_net(out), "conv1")
    u8 = qparam(read_net(tmp_path / "clx_force_u8.prototxt"), "conv1")
    assert list(u8.scale_params) == list(s8.scale_params) and u8.force_u8_input


def test_force_u8_through_images_on_a_deploy_net(tmp_path):
    """An Input net fed by --images: the preprocessing goes into the Input's transform_param
    (Intel's Input ignores it), the Input grows by the pad, and `calibrator test --images`
    on the files computes what the ImageData net computes on the same (uncropped) pixels."""
    write_images(tmp_path, size=12)
    text = NET.replace("crop_size: 12", "")
    image_net = text.format(data_type="ImageData", data_param=(
        f'image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/img/" '
        'batch_size: 4 }'))
    deploy = ('layer { name: "data" type: "Input" top: "data" '
              'input_param { shape { dim: 4 dim: 3 dim: 12 dim: 12 } } }\n'
              + image_net.split("}\n", 3)[3].replace(
                  'layer { name: "accuracy" type: "Accuracy" bottom: "pool" bottom: "label" '
                  'top: "accuracy" }\n', ""))
    (tmp_path / "image.prototxt").write_text(image_net)
    (tmp_path / "deploy.prototxt").write_text(deploy)
    net = parse_net(image_net)
    weights = random_weights(net, {"data": (4, 3, 12, 12), "label": (4,)}, seed=3)
    caffemodel = write_caffemodel(tmp_path / "w.caffemodel", weights, net)
    common = ["-w", str(caffemodel), "-1st", "-fu", "-q", "-s", "2", "-a", "DIRECT", "--quiet"]
    assert main(["-m", str(tmp_path / "image.prototxt")] + common) == 0
    assert main(["-m", str(tmp_path / "deploy.prototxt"), "--images", str(tmp_path / "img"),
                 "--mean", "104", "117", "123", "--norm", "0.0078125"] + common) == 0
    fu = read_net(tmp_path / "deploy_quantized_force_u8.prototxt")
    data = fu.layer[0]
    assert data.type == "Input" and list(data.input_param.shape[0].dim) == [4, 3, 16, 16]
    assert data.transform_param.pad == 2
    options = ImageFolderOptions(str(tmp_path / "img"))
    _, from_images = simulated(tmp_path / "deploy_quantized_force_u8.prototxt",
                               tmp_path / "w_new.caffemodel", options)
    _, from_layer = simulated(tmp_path / "image_quantized_force_u8.prototxt",
                              tmp_path / "w_new.caffemodel")
    for name in ("conv1", "conv2", "conv3"):
        np.testing.assert_array_equal(from_images[name], from_layer[name])
    assert main(["test", "-m", str(tmp_path / "deploy_quantized_force_u8.prototxt"), "-w",
                 str(tmp_path / "w_new.caffemodel"), "--images", str(tmp_path / "img"),
                 "-i", "1", "--quiet"]) == 0


@pytest.mark.parametrize("change, message", [
    (("mean_value: 104 mean_value: 117 mean_value: 123", 'mean_file: "mean.binaryproto"'),
     "mean_file"),
    (("pad: 2 stride: 1", "pad_h: 2 pad_w: 1"), "pad_h/pad_w"),
    (("bias_term: false", "bias_term: false"), None),
])
def test_refusals_name_the_reason(tmp_path, capsys, change, message):
    prototxt, caffemodel, _, weights = make_net(tmp_path)
    text = prototxt.read_text().replace(*change)
    if message is None:  # no bias and no BatchNorm on the first conv
        text = text.replace('layer { name: "bn1"', 'layer { include { phase: TRAIN } name: "bn1"')
        text = text.replace('layer { name: "scale1"',
                            'layer { include { phase: TRAIN } name: "scale1"')
        message = "no bias"
    if "mean_file" in message:
        blob = caffe_pb2.BlobProto()
        blob.shape.dim.extend([1, 3, 14, 14])
        blob.data.extend([100.0] * 3 * 14 * 14)
        (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    prototxt.write_text(text)
    code = main(["-m", str(prototxt), "-w", str(caffemodel), "-1st", "-fu", "-q", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "-fu" in err[0] and message in err[0]
    assert not (tmp_path / "net_quantized.prototxt").exists()


def test_a_first_conv_the_search_made_fp32_skips_fu_only(tmp_path, caplog):
    from calibrator.config import RunConfig
    from calibrator.pipeline import Pipeline
    from calibrator.quant.calibrate import calibrate
    from calibrator.quant.scales import QuantOptions, UnitChoice
    from calibrator.writers import OutputContext

    prototxt, caffemodel, _, _ = make_net(tmp_path)
    options = QuantOptions(first_conv=True, force_u8=True)
    config = RunConfig(prototxt, caffemodel, quant=options, quiet=True)
    model = load_model(prototxt, caffemodel)
    calibration = calibrate(model, options, 1, quiet=True)
    plan = calibration.plan({"conv1": UnitChoice(fp32=True)})
    pipeline = Pipeline(config)
    paths = pipeline.output_paths()
    with caplog.at_level("WARNING", logger="calibrator"):
        pipeline.write(paths, OutputContext(model, calibration.fused, plan, calibration.stats))
    err = caplog.text
    assert "'conv1' is FP32 in the final plan" in err and "not written" in err
    assert (tmp_path / "net_quantized.prototxt").exists()
    assert not (tmp_path / "net_quantized_force_u8.prototxt").exists()
    assert not (tmp_path / "net_new.caffemodel").exists()


def test_bias_correction_reaches_the_force_u8_caffemodel(tmp_path):
    """With --weights-out (bias correction), the _new.caffemodel carries the corrected
    biases too: conv2's is the corrected caffemodel's, conv1's b'' is computed from its
    corrected folded bias."""
    prototxt, caffemodel, _, _ = make_net(tmp_path)
    assert main(["-m", str(prototxt), "-w", str(caffemodel), "-1st", "-fu", "-q", "-s", "2",
                 "--quiet", "--weights-out", str(tmp_path / "corrected.caffemodel")]) == 0
    corrected = read_caffemodel(tmp_path / "corrected.caffemodel")
    new = read_caffemodel(tmp_path / "net_new.caffemodel")
    original = read_caffemodel(caffemodel)
    assert not np.array_equal(corrected["conv2"][1], original["conv2"][1])
    np.testing.assert_array_equal(new["conv2"][1], corrected["conv2"][1])
    s_in = qparam(read_net(tmp_path / "net_quantized.prototxt"), "conv1").scale_in[0]
    w_fold, b_fold = fold(corrected)                # the Scale's beta carries conv1's shift
    np.testing.assert_allclose(new["conv1"][1], new_first_bias(w_fold, b_fold, s_in),
                               rtol=1e-5, atol=1e-4)
