"""A deploy SSD net (Input -> ... -> DetectionOutput) turned into a TEST net that
``caffe test -detection`` users would write: an AnnotatedData layer reading a
``create_annoset`` list (see :mod:`calibrator.data.annotated`) replaces the Input, and a
DetectionEvaluate layer scores ``detection_out`` against the boxes.

The evaluation follows Caffe-SSD's own VOC test net (``ssd_pascal.py``): background label 0
(or DetectionOutput's), ``overlap_threshold: 0.5``, ``evaluate_difficult_gt: false``
(difficult boxes neither count as positives nor make false positives, as in the VOC
devkit), and, when a name/size file is given, boxes compared in pixels of the original
images (clipped to the image, IoU with +1) with the same WARP ``resize_param`` as the data.
Without a name/size file boxes are compared in normalised coordinates. Paths are written
absolute, so the net can be run from any folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from calibrator.caffe import caffe_pb2
from calibrator.caffe.netstate import filter_net
from calibrator.detection.annoset import num_classes_of
from calibrator.errors import CalibratorError

_WARP = caffe_pb2.ResizeParameter.WARP
_LINEAR = caffe_pb2.ResizeParameter.LINEAR


def _resize_param(message, height: int, width: int) -> None:
    message.resize_mode = _WARP
    message.height = height
    message.width = width
    message.interp_mode.append(_LINEAR)


def add_detection_evaluation(net_param, list_path: str | os.PathLike,
                             labelmap: str | os.PathLike,
                             name_size: str | os.PathLike | None = None,
                             mean: Sequence[float] = (0.0, 0.0, 0.0), norm: float = 1.0,
                             size: Sequence[int] | None = None, *,
                             batch_size: int | None = None,
                             evaluate_difficult_gt: bool = False,
                             overlap_threshold: float = 0.5) -> caffe_pb2.NetParameter:
    """The TEST net of ``net_param`` (a deploy net with one Input and one DetectionOutput)
    fed from the list ``list_path`` (``IMAGE XML`` lines) and scored by DetectionEvaluate.

    Preprocessing: resize (WARP, bilinear) to ``size`` = (H, W) (default: the Input's),
    then ``(pixel - mean) * norm``. ``batch_size`` defaults to the Input's batch dimension.
    ``num_classes`` of the evaluation is the label map's largest label + 1. The outputs are
    the DetectionEvaluate top ``detection_eval`` (and any other output the net had)."""
    test = filter_net(net_param)
    inputs = [i for i, l in enumerate(test.layer) if l.type == "Input"]
    if len(inputs) != 1 or len(test.layer[inputs[0]].top) != 1:
        raise CalibratorError("add_detection_evaluation needs a deploy net with exactly one "
                              "Input blob")
    outputs = [l for l in test.layer if l.type == "DetectionOutput"]
    if len(outputs) != 1:
        raise CalibratorError(f"add_detection_evaluation needs exactly one DetectionOutput "
                              f"layer, found {len(outputs)}")
    source = test.layer[inputs[0]]
    dims = [int(d) for d in source.input_param.shape[0].dim] if len(source.input_param.shape) \
        else []
    if size is None:
        if len(dims) != 4:
            raise CalibratorError("the Input has no NxCxHxW shape: give the size")
        size = dims[2:]
    height, width = (int(s) for s in size)
    if batch_size is None:
        batch_size = dims[0] if len(dims) == 4 and dims[0] > 0 else 1
    mean = [float(m) for m in mean]
    list_path, labelmap = Path(list_path).resolve(), Path(labelmap).resolve()
    for path, what in ((list_path, "list file"), (labelmap, "label map")):
        if not path.is_file():
            raise CalibratorError(f"{path}: {what} not found")
    num_classes = num_classes_of(labelmap)

    data_top, label_top = source.top[0], "label"
    taken = {t for l in test.layer for t in l.top}
    while label_top in taken:
        label_top += "_"
    eval_top = "detection_eval"
    while eval_top in taken:
        eval_top += "_"

    out = caffe_pb2.NetParameter(name=test.name)
    for index, layer in enumerate(test.layer):
        if index == inputs[0]:
            data = out.layer.add(name=source.name, type="AnnotatedData")
            data.top.extend([data_top, label_top])
            tp = data.transform_param
            tp.mean_value.extend(mean)
            if norm != 1.0:
                tp.scale = norm
            _resize_param(tp.resize_param, height, width)
            data.data_param.source = str(list_path)
            data.data_param.batch_size = batch_size
            data.annotated_data_param.label_map_file = str(labelmap)
            continue
        out.layer.add().CopyFrom(layer)

    det = outputs[0]
    background = det.detection_output_param.background_label_id
    evaluate = out.layer.add(name="detection_eval", type="DetectionEvaluate")
    evaluate.bottom.extend([det.top[0], label_top])
    evaluate.top.append(eval_top)
    p = evaluate.detection_evaluate_param
    p.num_classes = num_classes
    p.background_label_id = background if background >= 0 else 0
    p.overlap_threshold = overlap_threshold
    p.evaluate_difficult_gt = evaluate_difficult_gt
    if name_size is not None:
        name_size = Path(name_size).resolve()
        if not name_size.is_file():
            raise CalibratorError(f"{name_size}: name size file not found")
        p.name_size_file = str(name_size)
        _resize_param(p.resize_param, height, width)
    return out
