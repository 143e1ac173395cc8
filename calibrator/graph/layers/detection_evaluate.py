"""Caffe-SSD's DetectionEvaluate: per-detection TP/FP flags for the mAP of
``caffe test -detection`` (see :mod:`calibrator.detection.matching` for the matching rules
and :mod:`calibrator.detection.map` for the mAP).

Bottoms: detections ``(1, 1, D, 7)`` from DetectionOutput and ground truth ``(1, 1, G, 8)``
from AnnotatedData. Top ``(1, 1, num_classes - 1 + D', 5)``: one ``[-1, label, num_pos, -1,
-1]`` row per non-background label, then ``[item_id, label, score, tp, fp]`` per detection
(D' = the detections whose label is not -1).

With ``name_size_file`` the layer keeps Caffe's running image counter (which line of the file
the next image is): call :meth:`DetectionEvaluate.reset` (or :func:`reset_state` on a net)
before every pass that starts again at the first image, or :func:`seek_state` before a batch
evaluated out of order. The file is opened as given, from
the working directory, as Caffe does (an absolute path is safest). An all-zero ground-truth
blob (the zeros the graph runs through layers to learn their shapes; real label blobs never
are, Caffe rejects label 0 = background) leaves the counter untouched.
"""

from __future__ import annotations

import os

import torch

from calibrator.detection.matching import EvaluateConfig, ResizeSpec, evaluate_batch, \
    read_name_size
from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import check_io


@register("DetectionEvaluate")
class DetectionEvaluate(Layer):
    num_tops = 1

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (2, 2), (1, 1))
        if set(param.top) & set(param.bottom):
            raise self.error("cannot run in place: its top must not overwrite the detections "
                             "or labels it evaluates")
        p = param.detection_evaluate_param
        if not p.HasField("num_classes"):
            raise self.error("must provide num_classes")
        if not p.overlap_threshold > 0:
            raise self.error("overlap_threshold must be positive")
        for shape, width, what in ((self.bottom_shapes[0], 7, "detections"),
                                   (self.bottom_shapes[1], 8, "ground truth")):
            if len(shape) != 4 or shape[0] != 1 or shape[1] != 1 or shape[3] != width:
                raise self.error(f"{what} bottom must be (1, 1, N, {width}), got {shape}")
        sizes = None
        if p.HasField("name_size_file"):
            if not os.path.isfile(p.name_size_file):
                raise self.error(f"name_size_file {p.name_size_file} not found (opened from "
                                 f"the working directory {os.getcwd()}, as Caffe does)")
            sizes = read_name_size(p.name_size_file)
            if not sizes:
                raise self.error(f"name_size_file {p.name_size_file} holds no "
                                 "'NAME HEIGHT WIDTH' line")
        self.config = EvaluateConfig(
            num_classes=int(p.num_classes), background_label_id=int(p.background_label_id),
            overlap_threshold=float(p.overlap_threshold),
            evaluate_difficult_gt=bool(p.evaluate_difficult_gt), sizes=sizes,
            resize=ResizeSpec.from_proto(p.resize_param) if p.HasField("resize_param") else None)
        self.count = 0  # Caffe's count_: the name_size line of the next image

    def reset(self) -> None:
        """Start again at the first line of the name size file."""
        self.count = 0

    def seek(self, image: int) -> None:
        """Make the next image the ``image``-th of the stream (its name size line, modulo the
        file's length): for evaluating batches out of order, ``seek(batch * batch_size)``
        before each. Caffe's counter agrees as long as every image has a detection row."""
        sizes = self.config.sizes
        self.count = image % len(sizes) if sizes else 0

    def forward(self, detections: torch.Tensor, ground_truth: torch.Tensor):
        det = detections.detach().float().cpu().numpy().reshape(-1, 7)
        gt = ground_truth.detach().float().cpu().numpy().reshape(-1, 8)
        probe = gt.size > 0 and not gt.any()
        rows, count = evaluate_batch(det, gt, self.config, self.count)
        if not probe:
            self.count = count
        return (torch.from_numpy(rows).to(detections.device).view(1, 1, -1, 5),)


def reset_state(net) -> None:
    """Reset every DetectionEvaluate layer of a CaffeNet (call before each evaluation pass)."""
    for node in getattr(net, "nodes", []):
        if isinstance(node.module, DetectionEvaluate):
            node.module.reset()


def seek_state(net, image: int) -> None:
    """:meth:`DetectionEvaluate.seek` on every DetectionEvaluate layer of a CaffeNet."""
    for node in getattr(net, "nodes", []):
        if isinstance(node.module, DetectionEvaluate):
            node.module.seek(image)


def evaluation_outputs(net) -> list[str]:
    """The net outputs that DetectionEvaluate layers produce (feed them to
    :func:`calibrator.detection.map.detection_map`)."""
    tops = {top for node in getattr(net, "nodes", []) if node.type == "DetectionEvaluate"
            for top in node.tops}
    return [name for name in net.output_names if name in tops]


__all__ = ["DetectionEvaluate", "evaluation_outputs", "reset_state", "seek_state"]
