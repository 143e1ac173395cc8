"""``calibrator test`` end to end: printed means and ``--dump`` files against an independent
numpy computation on tiny synthetic nets (ImageData, deploy + --images, V1 format), and the
shared MobileNetV2 (slow) against the accuracy its README states.

The helpers (``TinyNet``, ``run_cli``...) are also used by ``tests/test_cli_errors.py``."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from calibrator.caffe import caffe_pb2
from calibrator.caffe.caffemodel import write_caffemodel
from calibrator.cli.main import main

# --- tiny nets ---------------------------------------------------------------------------

MEAN = (10.0, 20.0, 30.0)  # B, G, R
SCALE = 0.0125
IMAGE_SIZE = (8, 8)  # H, W of the ImageData images (no resize)
CLASSES = 5

IMAGE_DATA = """layer {{ name: "data" type: "ImageData" top: "data" top: "label"
  include {{ phase: TEST }}
  transform_param {{ scale: {scale} mean_value: {m[0]} mean_value: {m[1]} mean_value: {m[2]} }}
  image_data_param {{ source: "{source}" batch_size: {batch} }} }}
"""
INPUT = """layer {{ name: "input" type: "Input" top: "data"
  input_param {{ shape {{ dim: {n} dim: 3 dim: {h} dim: {w} }} }} }}
"""
CONV = """layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
"""
GLOBAL_POOL = """layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: AVE global_pooling: true } }
"""
CLASSIFIER = """layer {{ name: "ip" type: "InnerProduct" bottom: "{bottom}" top: "ip"
  inner_product_param {{ num_output: {classes} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "ip" top: "prob" }}
"""
ACCURACY = """layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label"
  top: "accuracy" }
layer { name: "acc3" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy-top3"
  accuracy_param { top_k: 3 } }
"""


def image_data_prototxt(source: str = "list.txt", batch: int = 2) -> str:
    """ImageData -> Convolution -> ReLU -> InnerProduct -> Softmax, two Accuracy layers;
    outputs: prob (batch x 5), accuracy, accuracy-top3."""
    return ('name: "tiny"\n' + IMAGE_DATA.format(scale=SCALE, m=MEAN, source=source,
                                                   batch=batch)
            + CONV + CLASSIFIER.format(bottom="conv", classes=CLASSES) + ACCURACY)


def deploy_prototxt(n: int, h: int, w: int) -> str:
    """Input -> Convolution -> ReLU -> global AVE Pooling -> InnerProduct -> Softmax (any
    input size fits the weights)."""
    return ('name: "tiny_deploy"\n' + INPUT.format(n=n, h=h, w=w) + CONV + GLOBAL_POOL
            + CLASSIFIER.format(bottom="pool", classes=CLASSES))


def tiny_weights(seed: int = 0, ip_inputs: int = 4 * 4 * 4) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "conv": [rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
                 rng.normal(0, 0.1, (4,)).astype(np.float32)],
        "ip": [rng.normal(0, 0.3, (CLASSES, ip_inputs)).astype(np.float32),
               rng.normal(0, 0.1, (CLASSES,)).astype(np.float32)],
    }


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.asarray(image, dtype=np.uint8))
    return path


def random_images(rng, count: int, size=IMAGE_SIZE) -> list[np.ndarray]:
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


@dataclass
class TinyNet:
    """A tiny ImageData net in a folder: prototxt, caffemodel, list file and PNG images."""

    folder: Path
    prototxt: Path
    weights_path: Path
    weights: dict
    images: list[np.ndarray]
    labels: list[int]
    batch: int

    def argv(self, *extra: str, iterations: int = 3) -> list[str]:
        return ["test", "-m", str(self.prototxt), "-w", str(self.weights_path),
                "-i", str(iterations), "--quiet", *extra]


def make_tiny_net(folder: Path, count: int = 5, batch: int = 2, seed: int = 0) -> TinyNet:
    """``count`` random 8x8 PNG images; labels chosen so that the top-1 and top-3
    accuracies differ and are neither 0 nor 1: image i is labelled with its best, second
    best or worst class for i % 3 = 0, 1, 2."""
    rng = np.random.default_rng(seed)
    images = random_images(rng, count)
    weights = tiny_weights(seed)
    logits = classifier_logits(preprocess(images), weights)
    labels = [int(np.argsort(-l)[[0, 1, -1][i % 3]]) for i, l in enumerate(logits)]
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        write_png(folder / "images" / f"img{i}.png", image)
        lines.append(f"images/img{i}.png {label}\n")
    (folder / "list.txt").write_text("".join(lines))
    prototxt = folder / "net.prototxt"
    prototxt.write_text(image_data_prototxt(batch=batch))
    weights_path = write_caffemodel(folder / "net.caffemodel", weights)
    return TinyNet(folder, prototxt, weights_path, weights, images, labels, batch)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``calibrator`` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def parse_lines(stdout: str) -> dict[str, list[float]]:
    """``name = value`` lines as name -> values (a blob of several values prints several)."""
    values: dict[str, list[float]] = {}
    for line in stdout.splitlines():
        name, _, value = line.partition(" = ")
        assert _, f"unexpected output line {line!r}"
        values.setdefault(name, []).append(float(value))
    return values


# --- the independent numpy reference -----------------------------------------------------

def preprocess(images, mean=MEAN, scale=SCALE) -> np.ndarray:
    """BGR uint8 HWC images -> (pixel - mean) * scale, NCHW float64."""
    batch = np.stack([np.asarray(i, np.float64) for i in images])
    return ((batch - np.asarray(mean)) * scale).transpose(0, 3, 1, 2)


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int, pad: int):
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out_h, out_w = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
            out += np.einsum("nchw,oc->nohw", patch, weight[:, :, i, j].astype(np.float64))
    return out + bias.astype(np.float64)[None, :, None, None]


def classifier_logits(x: np.ndarray, weights, global_pool: bool = False) -> np.ndarray:
    conv_w, conv_b = weights["conv"]
    features = np.maximum(conv2d(x, conv_w, conv_b, stride=2, pad=1), 0)
    features = features.mean(axis=(2, 3)) if global_pool else features.reshape(len(x), -1)
    ip_w, ip_b = weights["ip"]
    return features @ ip_w.astype(np.float64).T + ip_b


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits: np.ndarray, labels, top_k: int) -> float:
    """Caffe's rule: correct when fewer than top_k other classes score >= the label."""
    labels = np.asarray(labels)
    label_scores = logits[np.arange(len(labels)), labels]
    others = (logits >= label_scores[:, None]).sum(axis=1) - 1
    return float(np.mean(others < top_k))


def expected_batches(net: TinyNet, iterations: int) -> list[dict[str, np.ndarray]]:
    """Every output blob of every batch (the list wraps around as in Caffe)."""
    out = []
    for b in range(iterations):
        samples = [(b * net.batch + k) % len(net.images) for k in range(net.batch)]
        logits = classifier_logits(preprocess([net.images[s] for s in samples]), net.weights)
        labels = [net.labels[s] for s in samples]
        out.append({"prob": softmax(logits), "accuracy": np.float64(accuracy(logits, labels, 1)),
                    "accuracy-top3": np.float64(accuracy(logits, labels, 3))})
    return out


def assert_printed_means(stdout: str, batches: list[dict[str, np.ndarray]]) -> None:
    printed = parse_lines(stdout)
    assert set(printed) == set(batches[0])
    for name in batches[0]:
        mean = np.mean([b[name] for b in batches], axis=0).ravel()
        np.testing.assert_allclose(printed[name], mean, rtol=1e-5, atol=1e-7, err_msg=name)


# --- tiny ImageData net --------------------------------------------------------------------

def test_printed_values_are_the_mean_over_batches(tmp_path, capsys):
    net = make_tiny_net(tmp_path)
    code, out, err = run_cli(net.argv(iterations=3), capsys)  # 6 samples of 5: wraps
    assert code == 0, err
    batches = expected_batches(net, 3)
    assert_printed_means(out, batches)
    # accuracies print exactly as caffe's %g of the mean
    lines = out.splitlines()
    for name in ("accuracy", "accuracy-top3"):
        mean = np.mean([b[name] for b in batches])
        assert f"{name} = {mean:.6g}" in lines
    top1, top3 = ([b[name] for b in batches] for name in ("accuracy", "accuracy-top3"))
    assert 0 < np.mean(top1) < np.mean(top3) < 1 and len(set(top3)) > 1  # a real average


def test_dump_writes_every_output_blob_of_every_batch(tmp_path, capsys):
    net = make_tiny_net(tmp_path / "net")
    dump = tmp_path / "dump"
    code, _, err = run_cli(net.argv("--dump", str(dump), iterations=3), capsys)
    assert code == 0, err
    batches = expected_batches(net, 3)
    expected_files = {f"{name}_{b}.npy" for b in range(3) for name in batches[0]}
    assert {p.name for p in dump.iterdir()} == expected_files
    for b, blobs in enumerate(batches):
        for name, value in blobs.items():
            saved = np.load(dump / f"{name}_{b}.npy")
            assert saved.dtype == np.float32
            assert saved.shape == np.shape(value), name
            np.testing.assert_allclose(saved, value, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name}_{b}")


# --- deploy net fed from --images ----------------------------------------------------------

@pytest.mark.parametrize("extra, batch, size", [
    ((), 2, (6, 6)),  # the Input's own N, H, W
    (("--size", "5", "7", "--batch-size", "3"), 3, (5, 7)),
])
def test_deploy_net_with_images_folder(tmp_path, capsys, extra, batch, size):
    rng = np.random.default_rng(3)
    folder = tmp_path / "images"
    shapes = [(7, 9), (10, 5), (6, 6), (12, 11), (4, 8)]  # resized to `size`
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    names = ["e.png", "b.png", "a.png", "d.png", "c.PNG"]  # fed sorted by name
    for name, image in zip(names, images):
        write_png(folder / name, image)
    (folder / "notes.txt").write_text("not an image")
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(deploy_prototxt(2, 6, 6))
    weights = tiny_weights(seed=4, ip_inputs=4)
    weights_path = write_caffemodel(tmp_path / "deploy.caffemodel", weights)
    mean, norm, iterations = (5.0, 50.0, 100.0), 0.02, 3
    dump = tmp_path / "dump"
    code, out, err = run_cli(
        ["test", "-m", str(prototxt), "-w", str(weights_path), "-i", str(iterations),
         "--quiet", "--images", str(folder), "--mean", *map(str, mean), "--norm", str(norm),
         "--dump", str(dump), *extra], capsys)
    assert code == 0, err

    ordered = [cv2.imread(str(folder / n), cv2.IMREAD_COLOR) for n in sorted(names)]
    resized = [cv2.resize(i, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
               for i in ordered]
    batches = []
    for b in range(iterations):
        samples = [(b * batch + k) % len(resized) for k in range(batch)]
        x = preprocess([resized[s] for s in samples], mean, norm)
        batches.append({"prob": softmax(classifier_logits(x, weights, global_pool=True))})
    assert sorted(p.name for p in dump.iterdir()) == [f"prob_{b}.npy" for b in range(3)]
    for b, blobs in enumerate(batches):
        np.testing.assert_allclose(np.load(dump / f"prob_{b}.npy"), blobs["prob"],
                                   rtol=1e-5, atol=1e-7)
    assert_printed_means(out, batches)


# --- V1 format ---------------------------------------------------------------------------

V1_PROTOTXT = """name: "tiny_v1"
layers {{ name: "data" type: IMAGE_DATA top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: {scale} mean_value: {m[0]} mean_value: {m[1]} mean_value: {m[2]} }}
  image_data_param {{ source: "list.txt" batch_size: {batch} }} }}
layers {{ name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 stride: 2 }} }}
layers {{ name: "relu" type: RELU bottom: "conv" top: "conv" }}
layers {{ name: "ip" type: INNER_PRODUCT bottom: "conv" top: "ip"
  inner_product_param {{ num_output: {classes} }} }}
layers {{ name: "prob" type: SOFTMAX bottom: "ip" top: "prob" }}
layers {{ name: "acc" type: ACCURACY bottom: "ip" bottom: "label" top: "accuracy" }}
layers {{ name: "acc3" type: ACCURACY bottom: "ip" bottom: "label" top: "accuracy-top3"
  accuracy_param {{ top_k: 3 }} }}
layers {{ name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss"
  include {{ phase: TRAIN }} }}
"""


def write_v1_caffemodel(path: Path, weights) -> Path:
    """A V1 caffemodel (``layers`` with enum types) whose blobs use num/channels/height/width
    (4-D, leading 1s for InnerProduct weights and all biases), as old Caffe wrote them."""
    net = caffe_pb2.NetParameter(name="tiny_v1")
    types = {"conv": caffe_pb2.V1LayerParameter.CONVOLUTION,
             "ip": caffe_pb2.V1LayerParameter.INNER_PRODUCT}
    for name, blobs in weights.items():
        layer = net.layers.add(name=name, type=types[name])
        for array in blobs:
            dims = (1,) * (4 - array.ndim) + array.shape
            blob = layer.blobs.add(num=dims[0], channels=dims[1], height=dims[2], width=dims[3])
            blob.data.extend(array.ravel().tolist())
    path.write_bytes(net.SerializeToString())
    return path


def test_v1_prototxt_and_caffemodel_match_v2(tmp_path, capsys):
    net = make_tiny_net(tmp_path)
    v1_prototxt = tmp_path / "v1.prototxt"
    v1_prototxt.write_text(V1_PROTOTXT.format(scale=SCALE, m=MEAN, batch=net.batch,
                                              classes=CLASSES))
    v1_weights = write_v1_caffemodel(tmp_path / "v1.caffemodel", net.weights)
    outputs = {}
    for tag, prototxt, weights in (("v2", net.prototxt, net.weights_path),
                                   ("v1", v1_prototxt, v1_weights)):
        dump = tmp_path / f"dump_{tag}"
        code, out, err = run_cli(["test", "-m", str(prototxt), "-w", str(weights), "-i", "3",
                                  "--quiet", "--dump", str(dump)], capsys)
        assert code == 0, f"{tag}: {err}"
        outputs[tag] = out, {p.name: np.load(p) for p in dump.iterdir()}
    assert outputs["v1"][0] == outputs["v2"][0]
    assert outputs["v1"][1].keys() == outputs["v2"][1].keys() and outputs["v1"][1]
    for name, value in outputs["v2"][1].items():
        assert np.array_equal(outputs["v1"][1][name], value), name
    assert_printed_means(outputs["v1"][0], expected_batches(net, 3))


# --- the real MobileNetV2 (slow) ---------------------------------------------------------

@pytest.fixture(scope="session")
def mobilenet_test_run(shared):
    """One ``calibrator test -i 10`` run on the shared MobileNetV2 (500 images), shared by
    the tests below: (exit code, stdout, stderr)."""
    folder = shared / "models/mobilenet_v2"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["test", "-m", str(folder / "test.prototxt"),
                     "-w", str(folder / "mobilenet_v2.caffemodel"), "-i", "10", "--quiet"])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_mobilenet_v2_accuracy_as_readme(mobilenet_test_run):
    code, out, err = mobilenet_test_run
    assert code == 0, err
    lines = out.splitlines()
    assert "accuracy-top1 = 0.81" in lines
    assert "accuracy-top5 = 0.958" in lines


@pytest.mark.slow
def test_mobilenet_v2_prints_only_the_output_blobs(mobilenet_test_run):
    code, out, _ = mobilenet_test_run
    assert code == 0
    assert sorted(out.splitlines()) == ["accuracy-top1 = 0.81", "accuracy-top5 = 0.958"]
