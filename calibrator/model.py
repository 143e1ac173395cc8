"""Load a Caffe model for one phase: prototxt + caffemodel + data source -> runnable graph.

One loader for every command: the main command, ``test``, ``gate`` and ``verify`` load the
FP32 model with :func:`load_model`; a quantized prototxt of the same net runs on that model's
weights and batches through :func:`load_quantized`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from calibrator import data, distributed
from calibrator.caffe import caffe_pb2
from calibrator.caffe.caffemodel import read_caffemodel
from calibrator.caffe.compiled_weights import apply_compiled_weights
from calibrator.caffe.netstate import filter_net
from calibrator.caffe.prototxt import read_net
from calibrator.caffe.types import DATA_LAYER_TYPES
from calibrator.data.options import DetectionListOptions, ImageFolderOptions
from calibrator.data.paths import resolve_path
from calibrator.detection.deploy import add_detection_evaluation
from calibrator.errors import CalibratorError
from calibrator.graph.layer import layer_class
from calibrator.graph.net import CaffeNet
from calibrator.quant.fusion import FusedGraph, analyze
from calibrator.quant.params import from_proto, has_quantization
from calibrator.quant.scales import QuantPlan


@dataclass
class Model:
    prototxt: Path
    weights_path: Path | None
    net_param: caffe_pb2.NetParameter  # the whole upgraded net (writers keep every layer)
    test_param: caffe_pb2.NetParameter  # the TEST-phase layers
    weights: dict
    net: CaffeNet
    source: object | None  # calibrator.data.DataSource
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def batch_size(self) -> int:
        return self.source.batch_size if self.source is not None else 1


def select_device(gpu: int | None) -> torch.device:
    """``--gpu ID`` as Caffe takes it; None or a negative id runs on the CPU. Under torchrun
    each rank takes its own device: ``cuda:(ID + LOCAL_RANK)`` (``--gpu 0`` with N ranks
    per node: GPUs 0..N-1 of each node)."""
    if gpu is None or gpu < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CalibratorError(f"--gpu {gpu}: no CUDA device is available (run without --gpu)")
    index = gpu + distributed.local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        if distributed.world() > 1:
            raise CalibratorError(f"--gpu {gpu}: local rank {distributed.local_rank()} needs "
                                  f"CUDA device {index} (ID + LOCAL_RANK), this node has "
                                  f"{count}")
        raise CalibratorError(f"--gpu {gpu}: only {count} CUDA device(s)")
    if distributed.active():
        torch.cuda.set_device(index)  # NCCL's device for this rank
    return torch.device(f"cuda:{index}")


def build_source(test_param, base_dir: Path, images: ImageFolderOptions | None):
    """The data source that feeds the net's data layer (or the image folder of a deploy net)."""
    data_layers = [l for l in test_param.layer if data.is_data_layer(l.type)]
    if images is not None:
        return image_folder_source(test_param, base_dir, images)
    if len(data_layers) > 1:
        names = ", ".join(l.name for l in data_layers)
        raise CalibratorError(f"the TEST phase has several data layers ({names}); keep one")
    if data_layers:
        return data.build_data_source(data_layers[0], base_dir)
    return None


#: What ``--images`` feeds the other tops of the layers it replaces: a data layer's labels
#: 0, an AnnotatedData's ground truth one ``-1`` row (Caffe's "no box"); DummyData its fill.
_LABEL_FILL = {"AnnotatedData": ((1, 1, 1, 8), -1.0)}


def image_folder_source(test_param, base_dir: Path, images: ImageFolderOptions):
    """``--images``: the image folder replaces the first Input, DummyData or data layer
    (its first top; the sizes its shape, crop_size or --size give); the other tops of those
    layers get constants. An Input that carries a ``transform_param`` (the deploy net of
    ``-fu``) is preprocessed by it instead of --mean/--norm."""
    feeding = [l for l in test_param.layer if l.type == "Input" or data.is_data_layer(l.type)]
    if not feeding or not len(feeding[0].top):
        raise CalibratorError("--images needs a net with an Input, DummyData or data layer")
    layer = feeding[0]
    transform, shape = None, None
    if layer.type == "Input" and len(layer.input_param.shape):
        shape = tuple(int(d) for d in layer.input_param.shape[0].dim)
    elif layer.type == "DummyData":
        shape = tuple(layer_class("DummyData")(layer, []).input_shapes()[0])
    elif layer.transform_param.crop_size:
        crop = int(layer.transform_param.crop_size)
        shape = (_batch_size_of(layer) or 1, 3, crop, crop)
    if shape is None and not images.size:
        raise CalibratorError(f"--images: give --size for layer '{layer.name}' "
                              f"({layer.type}: no declared input size)")
    if shape is None:
        shape = (_batch_size_of(layer) or 1, 3, *images.size)
    size = images.size
    if layer.type == "Input" and layer.HasField("transform_param"):
        transform = data.Transform.from_layer(layer, base_dir)
        if size is None:
            size = (shape[2] - 2 * transform.pad, shape[3] - 2 * transform.pad)
        print(f"note: --images preprocessed by the transform_param of '{layer.name}' "
              f"(--mean/--norm not used)", file=sys.stderr, flush=True)
    constants = {}
    for other in feeding:
        if other.type == "Input" and other is not layer:
            raise CalibratorError("--images feeds one Input; the net has several")
        for i, top in enumerate(other.top):
            if other is layer and i == 0:
                continue
            if other.type == "DummyData":
                dummy = layer_class("DummyData")(other, [])
                constants[top] = (dummy.input_shapes()[i], dummy.values[i])
            else:
                constants[top] = _LABEL_FILL.get(other.type, ((None,), 0.0))
    batch = images.batch_size or shape[0]
    return data.build_image_folder_source(
        images.folder, layer.top[0], (batch,) + tuple(shape[1:]), images.mean, images.norm,
        size, batch_size=batch, transform=transform, constants=constants)


def _batch_size_of(layer) -> int | None:
    """A data layer's batch_size (data_param for Data/AnnotatedData, else image_data_param)."""
    for param in ("data_param", "image_data_param"):
        if layer.HasField(param) and getattr(layer, param).batch_size:
            return int(getattr(layer, param).batch_size)
    return None


def _absolute_evaluation_paths(test_param, base_dir: Path) -> None:
    """DetectionEvaluate opens its name/size file itself: resolve it as the data layers
    resolve their paths (the prototxt's folder first, then the working directory)."""
    for layer in test_param.layer:
        if layer.type == "DetectionEvaluate":
            param = layer.detection_evaluate_param
            found = resolve_path(param.name_size_file, base_dir) if param.name_size_file else None
            if found is not None:  # else the layer's own error names the missing file
                param.name_size_file = str(found)


def load_model(prototxt: str | os.PathLike, weights: str | os.PathLike | None, *,
               images: ImageFolderOptions | None = None, device: torch.device | None = None,
               stages: Sequence[str] = (), need_source: bool = True,
               require_weights: bool = True,
               detection_list: DetectionListOptions | None = None) -> Model:
    prototxt = Path(prototxt)
    net_param = read_net(prototxt)  # written back with scales: the user's own net
    evaluated = with_detection_list(net_param, detection_list)
    if detection_list is not None:
        images = None
    test_param = filter_net(evaluated, caffe_pb2.TEST, stages)
    _absolute_evaluation_paths(test_param, prototxt.parent)
    weight_blobs = read_caffemodel(weights) if weights is not None else {}
    apply_compiled_weights(test_param, weight_blobs)  # a caffemodel Intel saved compiled
    source = build_source(test_param, prototxt.parent, images)
    if source is None and need_source and not any(l.type == "Input" for l in test_param.layer):
        raise CalibratorError(f"{prototxt}: the TEST phase has no data layer or Input")
    device = device or torch.device("cpu")
    net = _built_net(test_param, weight_blobs, source, prototxt,
                     require_weights and weights is not None, device)
    return Model(prototxt, Path(weights) if weights else None, net_param, test_param,
                 weight_blobs, net, source, device)


def _built_net(test_param, weights: dict, source, prototxt: Path, require_weights: bool,
               device: torch.device) -> CaffeNet:
    """The TEST net on ``weights``, shaped by ``source``'s tops, on ``device``, in eval."""
    input_shapes = source.top_shapes() if source is not None else {}
    net = CaffeNet(test_param, weights, input_shapes, source=str(prototxt),
                   require_weights=require_weights)
    net.to(device).eval()
    return net


def with_weights(model: Model, weights: dict) -> Model:
    """``model`` running other weights (the same layers and data): e.g. equalized ones."""
    net = _built_net(model.test_param, weights, model.source, model.prototxt,
                     model.weights_path is not None, model.device)
    return replace(model, weights=weights, net=net)


def with_detection_list(net_param, options: DetectionListOptions | None):
    """The net a deploy detector is evaluated as on a ``--det-list`` (unchanged without)."""
    if options is None:
        return net_param
    return add_detection_evaluation(net_param, options.list_path, options.labelmap,
                                    options.name_size, options.mean, options.norm,
                                    options.size, batch_size=options.batch_size)


@dataclass
class QuantizedNet:
    """A quantized prototxt's TEST net on an FP32 model's weights, and its plan."""

    prototxt: Path
    net: CaffeNet
    fused: FusedGraph
    plan: QuantPlan


def quantized_plan(net: CaffeNet) -> tuple[FusedGraph, QuantPlan] | None:
    """The fused view and the plan a net's ``quantization_param`` describe (None if none)."""
    if not has_quantization(net.net_param):
        return None
    fused = analyze(net, quantize_fc=True)
    return fused, from_proto(fused)


def _signature(test_param) -> list[tuple]:
    return [(l.name, l.type, tuple(l.bottom), tuple(l.top)) for l in test_param.layer
            if l.type not in DATA_LAYER_TYPES and l.type != "Input"]


def load_quantized(fp32: Model, prototxt: str | os.PathLike,
                   detection_list: DetectionListOptions | None = None) -> QuantizedNet:
    """The INT8 prototxt ``prototxt`` of ``fp32``'s net, run on ``fp32``'s weights and
    batches (its layers must be the same, with quantization_param on the INT8 ones)."""
    prototxt = Path(prototxt)
    net_param = read_net(prototxt)
    if not has_quantization(net_param):
        raise CalibratorError(f"{prototxt}: no layer carries quantization_param (not an "
                              "INT8 prototxt)")
    test_param = filter_net(with_detection_list(net_param, detection_list), caffe_pb2.TEST)
    apply_compiled_weights(test_param, fp32.weights)
    ours, theirs = _signature(test_param), _signature(fp32.test_param)
    if ours != theirs:
        where = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
        what = (f"layer {where}: {ours[where][:2]} vs FP32 {theirs[where][:2]}"
                if where < min(len(ours), len(theirs))
                else f"{len(ours)} layers vs {len(theirs)} in the FP32 net")
        raise CalibratorError(f"{prototxt}: not the INT8 form of {fp32.prototxt} ({what})")
    net = CaffeNet(test_param, fp32.weights, fp32.source.top_shapes(), source=str(prototxt))
    net.to(fp32.device).eval()
    fused, plan = quantized_plan(net)
    return QuantizedNet(prototxt, net, fused, plan)
