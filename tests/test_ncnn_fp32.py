"""The FP32 ncnn model we write, run by ncnn's own kernels (the ``ncnn`` package), against
Caffe semantics: per layer type against our CaffeNet (itself checked against OpenCV dnn in
test_fidelity_opencv.py), and on the real shared models against OpenCV's Caffe importer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrator.ncnn.writer import write_ncnn_model
from tests.quant_helpers import TinyNet, input_text

pytest.importorskip("ncnn")
from calibrator.ncnn.runtime import run_ncnn  # noqa: E402


def L(name, kind, bottom, top, extra=""):
    return (f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top}" '
            f'{extra} }}\n')


CASES = {
    "prelu": L("l", "PReLU", "data", "y"),
    "sigmoid_tanh": L("l", "Sigmoid", "data", "y") + L("t", "TanH", "y", "z"),
    "absval_threshold": L("l", "AbsVal", "data", "y")
    + L("t", "Threshold", "y", "z", "threshold_param { threshold: 0.2 }"),
    "elu_bnll": L("l", "ELU", "data", "y", "elu_param { alpha: 0.7 }") + L("b", "BNLL", "y", "z"),
    "power_exp_log": L("p", "Power", "data", "p", "power_param { power: 2 scale: 0.5 shift: 1.5 }")
    + L("e", "Exp", "p", "e", "exp_param { base: 2 scale: 0.5 shift: 0.1 }")
    + L("l", "Log", "e", "y", "log_param { base: 10 scale: 2 shift: 1 }"),
    "scale_bias": L("l", "Scale", "data", "y", "scale_param { bias_term: true }")
    + L("b", "Bias", "y", "z"),
    "leaky_relu_clip_relu6": L("l", "ReLU", "data", "y", "relu_param { negative_slope: 0.1 }")
    + L("c", "Clip", "y", "z", "clip_param { min: -0.5 max: 0.7 }") + L("r", "ReLU6", "data", "w"),
    "slice_concat_split": 'layer { name: "l" type: "Slice" bottom: "data" top: "a" top: "b" '
    'slice_param { axis: 1 slice_point: 4 } }\n'
    'layer { name: "s" type: "Split" bottom: "b" top: "b1" top: "b2" }\n'
    'layer { name: "c" type: "Concat" bottom: "b1" bottom: "a" bottom: "b2" top: "y" '
    'concat_param { axis: 2 } }\n',
    "flatten_reshape": L("f", "Flatten", "data", "f")
    + L("r", "Reshape", "data", "y", "reshape_param { shape { dim: 0 dim: -1 dim: 7 } }"),
    "permute": L("l", "Permute", "data", "y", "permute_param { order: 0 order: 2 order: 3 order: 1 }")
    + L("m", "Permute", "data", "z", "permute_param { order: 0 order: 3 order: 1 order: 2 }"),
    "lrn": L("l", "LRN", "data", "y", "lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 }")
    + L("w", "LRN", "data", "z", "lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 "
        "norm_region: WITHIN_CHANNEL }"),
    "mvn": L("l", "MVN", "data", "y")
    + L("v", "MVN", "data", "z", "mvn_param { normalize_variance: true across_channels: true }"),
    "normalize": L("l", "Normalize", "data", "y", "norm_param { across_spatial: false }")
    + L("s", "Normalize", "data", "z", "norm_param { across_spatial: true channel_shared: true }"),
    "shuffle_channel": L("l", "ShuffleChannel", "data", "y", "shuffle_channel_param { group: 2 }"),
    "deconvolution": L("l", "Deconvolution", "data", "y",
                       "convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 }")
    + L("g", "Deconvolution", "data", "z",
        "convolution_param { num_output: 8 kernel_size: 2 stride: 2 group: 8 }"),
    "conv_bn_scale_relu_dropout": L("c", "Convolution", "data", "c",
                                    "convolution_param { num_output: 4 kernel_size: 3 pad: 1 }")
    + L("bn", "BatchNorm", "c", "c") + L("s", "Scale", "c", "c", "scale_param { bias_term: true }")
    + L("r", "ReLU", "c", "c") + L("d", "Dropout", "c", "c"),
    "dw_bn_relu6_sigmoid_conv": L("c", "Convolution", "data", "c",
                                  "convolution_param { num_output: 8 kernel_size: 3 group: 8 }")
    + L("bn", "BatchNorm", "c", "c") + L("r", "ReLU6", "c", "c")
    + L("d", "Convolution", "c", "y", "convolution_param { num_output: 3 kernel_h: 3 kernel_w: 1 "
        "pad_h: 2 pad_w: 0 dilation: 2 stride_h: 2 stride_w: 1 }") + L("s", "Sigmoid", "y", "y"),
    # Caffe's ceil rounding, its dropped last window, and its AVE divisors
    "pooling": L("a", "Pooling", "data", "a", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
    + L("b", "Pooling", "data", "b", "pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 }")
    + L("c", "Pooling", "data", "c", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }")
    + L("d", "Pooling", "data", "d", "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }"),
    "eltwise": L("a", "TanH", "data", "a")
    + 'layer { name: "p" type: "Eltwise" bottom: "data" bottom: "a" top: "p" '
      'eltwise_param { operation: PROD } }\n'
      'layer { name: "m" type: "Eltwise" bottom: "data" bottom: "a" top: "m" '
      'eltwise_param { operation: MAX } }\n'
      'layer { name: "s" type: "Eltwise" bottom: "p" bottom: "m" top: "s" '
      'eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }\n',
    "fc_bn_relu_softmax": L("l", "InnerProduct", "data", "y", "inner_product_param { num_output: 8 }")
    + L("bn", "BatchNorm", "y", "y") + L("r", "ReLU", "y", "y") + L("s", "Softmax", "y", "z"),
    "global_pooling_then_fc_or_conv": L("p", "Pooling", "data", "p",
                                        "pooling_param { pool: MAX global_pooling: true }")
    + L("f", "Flatten", "p", "f") + L("fc", "InnerProduct", "f", "y",
                                      "inner_product_param { num_output: 5 }")
    + L("q", "Pooling", "data", "q", "pooling_param { pool: AVE global_pooling: true }")
    + L("c", "Convolution", "q", "z", "convolution_param { num_output: 5 kernel_size: 1 }")
    + L("s", "Softmax", "data", "w"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_types_match_caffe(case):
    net = TinyNet(input_text((2, 8, 7, 9)) + CASES[case], seed=1)
    model = write_ncnn_model(net.net, None, f"/tmp/ncnn_fp32_{case}")
    x = net.batches[0]["data"].numpy()
    with torch.no_grad():
        ours = net.net({"data": torch.from_numpy(x)})
    assert model.outputs and set(model.outputs) == set(ours)
    out = run_ncnn(model.param_path, model.bin_path, {model.inputs["data"]: x},
                   list(model.outputs.values()))
    for blob, ncnn_blob in model.outputs.items():
        ref = ours[blob].numpy()
        got = np.asarray(out[ncnn_blob])
        assert got.size == ref.size, (blob, got.shape, ref.shape)
        scale = max(float(np.abs(ref).max()), 1e-12)
        assert float(np.abs(got.reshape(ref.shape) - ref).max()) <= 1e-5 * scale, blob


# -- the real models against OpenCV dnn -------------------------------------------------------

def _opencv(prototxt, caffemodel, x, names):
    import cv2

    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    outs = []
    for i in range(len(x)):
        net.setInput(np.ascontiguousarray(x[i:i + 1]))
        outs.append([np.array(o) for o in net.forward(names)])
    return {n: [o[k] for o in outs] for k, n in enumerate(names)}


def _close(got, ref, what):
    ref = np.asarray(ref, np.float64).ravel()
    got = np.asarray(got, np.float64).ravel()
    assert got.size == ref.size, what
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), what


@pytest.mark.slow
def test_mobilenet_v2_matches_opencv(shared, tmp_path):
    import cv2

    from calibrator.model import load_model

    folder = shared / "models" / "mobilenet_v2"
    model = load_model(folder / "deploy.prototxt", folder / "mobilenet_v2.caffemodel",
                       need_source=False)
    ncnn_model = write_ncnn_model(model.net, None, tmp_path / "mobilenet_v2")
    images = sorted((shared / "data" / "imagenet-sample" / "images").glob("*.JPEG"))[:3]
    mean = np.float32([103.53, 116.28, 123.675])

    def crop(image):
        top, left = (image.shape[0] - 224) // 2, (image.shape[1] - 224) // 2
        return image[top:top + 224, left:left + 224]

    x = np.stack([((crop(cv2.imread(str(p))).astype(np.float32) - mean)
                   * np.float32(0.017)).transpose(2, 0, 1) for p in images])
    assert x.shape == (3, 3, 224, 224)
    ref = _opencv(folder / "deploy.prototxt", folder / "mobilenet_v2.caffemodel", x,
                  ["fc7", "prob"])
    out = run_ncnn(ncnn_model.param_path, ncnn_model.bin_path, {"data": x}, ["fc7", "prob"])
    for name in ("fc7", "prob"):
        for i in range(len(x)):
            _close(out[name][i], ref[name][i], f"{name} image {i}")


@pytest.mark.slow
def test_res10_ssd_matches_opencv(shared, tmp_path):
    import cv2

    from calibrator.model import load_model

    folder = shared / "models" / "res10_ssd"
    weights = folder / "res10_300x300_ssd_iter_140000.caffemodel"
    model = load_model(folder / "deploy.prototxt", weights, need_source=False)
    ncnn_model = write_ncnn_model(model.net, None, tmp_path / "res10")
    images = sorted((shared / "data" / "faces-pseudo" / "images").iterdir())[:3]
    x = np.stack([(cv2.resize(cv2.imread(str(p)), (300, 300)).astype(np.float32)
                   - np.float32([104, 177, 123])).transpose(2, 0, 1) for p in images])
    heads = ["mbox_loc", "mbox_conf_flatten", "mbox_priorbox"]
    ref = _opencv(folder / "deploy.prototxt", weights, x, heads + ["detection_out"])
    out = run_ncnn(ncnn_model.param_path, ncnn_model.bin_path, {"data": x},
                   heads + ["detection_out"])
    found = 0
    for i in range(len(x)):
        for name in heads:
            _close(out[name][i], ref[name][i], f"{name} image {i}")
        # detections: ncnn writes [label, score, box] rows sorted by score; compare the
        # confident ones with OpenCV's [image, label, score, box] rows
        theirs = ref["detection_out"][i].reshape(-1, 7)[:, 1:]
        theirs = theirs[theirs[:, 1] > 0.2]
        mine = np.asarray(out["detection_out"][i]).reshape(-1, 6)
        mine = mine[mine[:, 1] > 0.2]
        assert len(mine) == len(theirs), f"image {i}"
        order = lambda rows: rows[np.argsort(-rows[:, 1], kind="stable")]  # noqa: E731
        _close(order(mine), order(theirs), f"detections image {i}")
        found += len(mine)
    assert found > 0
