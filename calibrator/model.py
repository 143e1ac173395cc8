"""Load a Caffe model for one phase: prototxt + caffemodel + data source -> runnable graph.

One loader for every command: the main command, ``test``, ``gate`` and ``verify`` load the
FP32 model with :func:`load_model`; a quantized prototxt of the same net runs on that model's
weights and batches through :func:`load_quantized`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from calibrator import data, distributed
from calibrator.caffe import caffe_pb2
from calibrator.caffe.caffemodel import read_caffemodel
from calibrator.caffe.netstate import filter_net
from calibrator.caffe.prototxt import read_net
from calibrator.caffe.types import DATA_LAYER_TYPES
from calibrator.data.options import DetectionListOptions, ImageFolderOptions
from calibrator.data.paths import resolve_path
from calibrator.detection.deploy import add_detection_evaluation
from calibrator.errors import CalibratorError
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
    inputs = [l for l in test_param.layer if l.type == "Input"]
    if images is not None:
        if len(inputs) != 1 or len(inputs[0].top) != 1:
            raise CalibratorError("--images needs a deploy net with exactly one Input blob")
        layer = inputs[0]
        shape = tuple(int(d) for d in layer.input_param.shape[0].dim)
        batch = images.batch_size or shape[0]
        return data.build_image_folder_source(
            images.folder, layer.top[0], (batch,) + shape[1:], images.mean, images.norm,
            images.size, batch_size=batch)
    if len(data_layers) > 1:
        names = ", ".join(l.name for l in data_layers)
        raise CalibratorError(f"the TEST phase has several data layers ({names}); keep one")
    if data_layers:
        return data.build_data_source(data_layers[0], base_dir)
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
    source = build_source(test_param, prototxt.parent, images)
    if source is None and need_source and not any(l.type == "Input" for l in test_param.layer):
        raise CalibratorError(f"{prototxt}: the TEST phase has no data layer or Input")
    input_shapes = source.top_shapes() if source is not None else {}
    net = CaffeNet(test_param, weight_blobs, input_shapes, source=str(prototxt),
                   require_weights=require_weights and weights is not None)
    device = device or torch.device("cpu")
    net.to(device).eval()
    return Model(prototxt, Path(weights) if weights else None, net_param, test_param,
                 weight_blobs, net, source, device)


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
