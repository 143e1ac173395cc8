"""Matching detections to ground truth, image by image, as Caffe-SSD's DetectionEvaluate
layer does (weiliu89/caffe ``detection_evaluate_layer.cpp`` and ``bbox_util.cpp``).

Inputs are the blobs of the layer's two bottoms:

* detections ``(D, 7)``: ``[item_id, label, score, xmin, ymin, xmax, ymax]`` (DetectionOutput);
  rows with label -1 (DetectionOutput's "nothing found" rows) only mark the image as seen;
* ground truth ``(G, 8)``: ``[item_id, label, instance_id, xmin, ymin, xmax, ymax, difficult]``
  (AnnotatedData in TEST); reading stops at the first row whose item_id is -1.

Per image and label, detections are taken by score (descending) and each is matched to the
ground-truth box of the same label it overlaps most (first one on ties). It is a true positive
when that overlap is >= the threshold and the box was not matched before, a false positive
otherwise (a duplicate, a low overlap, no box of its label in the image), and *ignored* when
the box it matches is difficult and difficult boxes are not evaluated.

Boxes are compared in normalised coordinates (IoU without +1), unless a name/size file gives
each image's original size: then both boxes are clipped to [0, 1], scaled to pixels and
compared with Caffe's pixel IoU (+1 on widths and heights). Arithmetic is float32 as in Caffe.

Caffe-SSD quirks kept on purpose: with a name/size file, the image counter advances once per
image *that has a row in the detections* (an image without any detection in a batch where
others have some does not advance it); pixel IoU of two disjoint boxes is 1/(area1+area2-1),
not 0. Two deliberate differences: a row with the background label (Caffe aborts) is skipped,
and ties in score keep their input order (Caffe's ``std::sort`` leaves them unspecified).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from calibrator.errors import CalibratorError
from calibrator.fileio import read_bytes
from calibrator.detection import boxes as bx

F32 = np.float32

#: Status of a detection after matching.
TRUE_POS, FALSE_POS, IGNORED = 1, 0, -1

# ResizeParameter.Resize_mode
WARP, FIT_SMALL_SIZE, FIT_LARGE_SIZE_AND_PAD = 1, 2, 3


@dataclass(frozen=True)
class ResizeSpec:
    """The parts of a ``ResizeParameter`` that ``OutputBBox`` reads."""

    mode: int = WARP
    height: int = 0
    width: int = 0
    height_scale: int = 0
    width_scale: int = 0

    @classmethod
    def from_proto(cls, param) -> "ResizeSpec":
        return cls(int(param.resize_mode), int(param.height), int(param.width),
                   int(param.height_scale), int(param.width_scale))


def read_name_size(path: str | os.PathLike) -> list[tuple[int, int]]:
    """A Caffe-SSD name/size file: whitespace-separated ``NAME HEIGHT WIDTH`` triples, read as
    ``infile >> name >> height >> width`` does (reading stops at the first bad triple).
    Returns (height, width) per image, in file order."""
    tokens = read_bytes(path, "name/size file").decode("utf-8", errors="surrogateescape").split()
    sizes = []
    for i in range(0, len(tokens) - 2, 3):
        try:
            sizes.append((int(tokens[i + 1]), int(tokens[i + 2])))
        except ValueError:
            break
    return sizes


# --- Caffe's box arithmetic (numpy float32) ---------------------------------------------

def caffe_box_size(boxes: np.ndarray, normalized: bool = True) -> np.ndarray:
    """``BBoxSize``: w*h (normalised) or (w+1)*(h+1) (pixels); 0 for an inverted box."""
    boxes = np.asarray(boxes, F32)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    size = w * h if normalized else (w + F32(1)) * (h + F32(1))
    return np.where((w < 0) | (h < 0), F32(0), size).astype(F32)


def _clip(boxes: np.ndarray, height: float = 1.0, width: float = 1.0) -> np.ndarray:
    """``ClipBBox``: corners into [0, width] x [0, height] (default the unit square)."""
    out = boxes.copy()
    out[:, 0::2] = np.maximum(np.minimum(boxes[:, 0::2], F32(width)), F32(0))
    out[:, 1::2] = np.maximum(np.minimum(boxes[:, 1::2], F32(height)), F32(0))
    return out


def _scale(boxes: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``ScaleBBox``: normalised -> pixels, with the size Caffe stores for the result."""
    out = np.empty_like(boxes)
    out[:, 0::2] = boxes[:, 0::2] * F32(width)
    out[:, 1::2] = boxes[:, 1::2] * F32(height)
    return out, caffe_box_size(out, normalized=not (width > 1 or height > 1))


def project_boxes(source: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ProjectBBox`` of each box onto the window ``source`` ``(4,)``: the boxes in the
    window's coordinates, clipped to [0, 1], and whether each projection is valid (it
    overlaps the window and keeps a positive area). A box that misses the window entirely
    is returned unchanged (Caffe leaves the output untouched then)."""
    boxes = np.asarray(boxes, F32).reshape(-1, 4)
    s = np.asarray(source, F32)
    miss = ((boxes[:, 0] >= s[2]) | (boxes[:, 2] <= s[0]) |
            (boxes[:, 1] >= s[3]) | (boxes[:, 3] <= s[1]))
    sw, sh = s[2] - s[0], s[3] - s[1]
    proj = np.empty_like(boxes)
    proj[:, 0::2] = (boxes[:, 0::2] - s[0]) / sw
    proj[:, 1::2] = (boxes[:, 1::2] - s[1]) / sh
    proj = _clip(proj)
    valid = ~miss & (caffe_box_size(proj) > 0)
    return np.where(miss[:, None], boxes, proj), valid


def output_boxes(boxes: np.ndarray, height: int, width: int,
                 resize: ResizeSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``OutputBBox``: normalised boxes ``(n, 4)`` to pixels of the original ``height x width``
    image, undoing the test-time resize policy; returns (boxes, Caffe's stored sizes)."""
    boxes = np.asarray(boxes, F32).reshape(-1, 4)
    if resize is None or not resize.mode or resize.mode == WARP:
        return _scale(_clip(boxes), height, width)
    if resize.height <= 0 or resize.width <= 0:
        raise CalibratorError("resize_param: height and width must be positive")
    if resize.mode == FIT_LARGE_SIZE_AND_PAD:
        rh, rw = F32(resize.height), F32(resize.width)
        aspect = F32(width) / F32(height)
        if aspect > rw / rh:
            pad = (rh - rw / aspect) / F32(2)
            source = [0.0, float(pad / rh), 1.0, 1.0 - float(pad / rh)]
        else:
            pad = (rw - rh * aspect) / F32(2)
            source = [float(pad / rw), 0.0, 1.0 - float(pad / rw), 1.0]
        projected, _ = project_boxes(np.array(source, F32), boxes)
        return _scale(_clip(projected), height, width)
    if resize.mode == FIT_SMALL_SIZE:
        if resize.height_scale == 0 or resize.width_scale == 0:
            return _scale(_clip(boxes), height, width)
        scaled, _ = _scale(boxes, resize.height_scale, resize.width_scale)
        clipped = _clip(scaled, height, width)
        return clipped, caffe_box_size(clipped)  # Caffe stores the size without +1 here
    raise CalibratorError(f"resize_param: unknown resize_mode {resize.mode}")


def iou(det: np.ndarray, gt: np.ndarray, det_sizes: np.ndarray | None = None,
        gt_sizes: np.ndarray | None = None) -> np.ndarray:
    """``JaccardOverlap`` of every detection with every ground-truth box: ``(n, m)`` float32.

    Without sizes: normalised boxes (no +1; :func:`calibrator.detection.boxes.iou_matrix`). With
    the sizes ``output_boxes`` returns: pixel boxes, intersection with +1 as Caffe computes
    it (boxes that do not intersect get the intersection of a 1x1 box)."""
    det = np.asarray(det, F32).reshape(-1, 4)
    gt = np.asarray(gt, F32).reshape(-1, 4)
    if det_sizes is None:
        return bx.iou_matrix(torch.from_numpy(det), torch.from_numpy(gt)).numpy()
    a, b = det[:, None, :], gt[None, :, :]
    disjoint = ((b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0]) |
                (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1]))
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + F32(1)
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + F32(1)
    iw = np.where(disjoint, F32(1), iw)
    ih = np.where(disjoint, F32(1), ih)
    inter = iw * ih
    union = np.asarray(det_sizes, F32)[:, None] + np.asarray(gt_sizes, F32)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        overlap = inter / union
    return np.where((iw > 0) & (ih > 0), overlap, F32(0)).astype(F32)


# --- one image, one label ---------------------------------------------------------------

def match_detections(det_boxes, det_scores, gt_boxes, gt_difficult, *,
                     overlap_threshold: float = 0.5, evaluate_difficult_gt: bool = True,
                     det_sizes=None, gt_sizes=None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one image's detections of one label to its ground truth.

    Returns ``order``, the detection indices by score descending (ties in input order), and
    ``status`` per ordered detection: :data:`TRUE_POS`, :data:`FALSE_POS` or :data:`IGNORED`
    (matched to a difficult box that is not evaluated). Pass the ``output_boxes`` sizes to
    compare pixel boxes; without them the boxes are normalised."""
    scores = np.asarray(det_scores, F32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    status = np.full(order.size, FALSE_POS, dtype=np.int8)
    gt_boxes = np.asarray(gt_boxes, F32).reshape(-1, 4)
    if order.size == 0 or gt_boxes.shape[0] == 0:
        return order, status
    det_boxes = np.asarray(det_boxes, F32).reshape(-1, 4)
    if det_sizes is not None:
        det_sizes = np.asarray(det_sizes, F32)[order]
    overlaps = iou(det_boxes[order], gt_boxes, det_sizes, gt_sizes)
    best = overlaps.argmax(axis=1)  # first maximum, like Caffe's strict '>'
    best_overlap = overlaps[np.arange(order.size), best]
    difficult = np.asarray(gt_difficult, bool).reshape(-1)
    threshold = F32(overlap_threshold)
    visited = np.zeros(gt_boxes.shape[0], bool)
    for i in range(order.size):
        if best_overlap[i] >= threshold:
            j = best[i]
            if evaluate_difficult_gt or not difficult[j]:
                if not visited[j]:
                    status[i] = TRUE_POS
                    visited[j] = True
            else:
                status[i] = IGNORED
    return order, status


# --- one batch (the layer's forward) --------------------------------------------------------

@dataclass
class EvaluateConfig:
    """DetectionEvaluateParameter, resolved."""

    num_classes: int
    background_label_id: int = 0
    overlap_threshold: float = 0.5
    evaluate_difficult_gt: bool = True
    sizes: list[tuple[int, int]] | None = None  # (height, width) per image; None: normalised
    resize: ResizeSpec | None = None


def group_detections(det: np.ndarray, background_label_id: int) -> dict:
    """``GetDetectionResults``: {item_id: {label: row indices}}, background rows left out."""
    det = np.asarray(det, F32).reshape(-1, 7)
    items = det[:, 0].astype(np.int64)  # static_cast<int> truncates
    labels = det[:, 1].astype(np.int64)
    grouped: dict[int, dict[int, list[int]]] = {}
    for row, (item, label) in enumerate(zip(items.tolist(), labels.tolist())):
        if label == background_label_id:
            continue
        grouped.setdefault(item, {}).setdefault(label, []).append(row)
    return grouped


def group_ground_truth(gt: np.ndarray, background_label_id: int) -> dict:
    """``GetGroundTruth`` (difficult boxes included): {item_id: {label: row indices}},
    reading up to the first row whose item_id is -1; background rows left out."""
    gt = np.asarray(gt, F32).reshape(-1, 8)
    grouped: dict[int, dict[int, list[int]]] = {}
    for row, (item, label) in enumerate(zip(gt[:, 0].astype(np.int64).tolist(),
                                            gt[:, 1].astype(np.int64).tolist())):
        if item == -1:
            break
        if label == background_label_id:
            continue
        grouped.setdefault(item, {}).setdefault(label, []).append(row)
    return grouped


def evaluate_batch(det, gt, config: EvaluateConfig, count: int = 0
                   ) -> tuple[np.ndarray, int]:
    """DetectionEvaluate's forward on one batch: rows ``(R, 5)`` float32, and the image
    counter after the batch (only used with a name/size file).

    The rows are Caffe's: first ``[-1, label, num_pos, -1, -1]`` for every label but the
    background (num_pos: ground-truth boxes of the label in this batch, difficult ones only
    when evaluated), then ``[item_id, label, score, tp, fp]`` per detection, by item_id, then
    label, then score (descending) where the image has boxes of that label. An ignored
    detection has tp = fp = 0."""
    det = np.asarray(det, F32).reshape(-1, 7)
    gt = np.asarray(gt, F32).reshape(-1, 8)
    bg = config.background_label_id
    detections = group_detections(det, bg)
    truths = group_ground_truth(gt, bg)
    difficult_col = gt[:, 7] != 0

    num_pos: dict[int, int] = {}
    for labels in truths.values():
        for label, rows in labels.items():
            n = len(rows) if config.evaluate_difficult_gt else int((~difficult_col[rows]).sum())
            num_pos[label] = num_pos.get(label, 0) + n
    out = [[-1.0, float(c), float(num_pos.get(c, 0)), -1.0, -1.0]
           for c in range(config.num_classes) if c != bg]

    sizes = config.sizes or None
    for item in sorted(detections):
        image_truth = truths.get(item, {})
        for label in sorted(detections[item]):
            if label == -1:
                continue
            rows = detections[item][label]
            scores = det[rows, 2]
            if label not in image_truth:
                out.extend([float(item), float(label), float(s), 0.0, 1.0] for s in scores)
                continue
            gt_rows = image_truth[label]
            gt_boxes, det_boxes = gt[gt_rows, 3:7], det[rows, 3:7]
            gt_sizes = det_sizes = None
            if sizes is not None:
                if count >= len(sizes):
                    raise CalibratorError(
                        f"DetectionEvaluate: image {count + 1} has no line in the name size "
                        f"file ({len(sizes)} lines)")
                height, width = sizes[count]
                gt_boxes, gt_sizes = output_boxes(gt_boxes, height, width, config.resize)
                det_boxes, det_sizes = output_boxes(det_boxes, height, width, config.resize)
            order, status = match_detections(
                det_boxes, scores, gt_boxes, difficult_col[gt_rows],
                overlap_threshold=config.overlap_threshold,
                evaluate_difficult_gt=config.evaluate_difficult_gt,
                det_sizes=det_sizes, gt_sizes=gt_sizes)
            for k, s in zip(order.tolist(), status.tolist()):
                tp = 1.0 if s == TRUE_POS else 0.0
                fp = 1.0 if s == FALSE_POS else 0.0
                out.append([float(item), float(label), float(scores[k]), tp, fp])
        if sizes is not None:
            count = (count + 1) % len(sizes)
    return np.asarray(out, dtype=F32).reshape(-1, 5), count
