"""The mAP that ``caffe test -detection`` (Intel Caffe) and Caffe-SSD's solver report from
DetectionEvaluate outputs accumulated over all iterations.

Each DetectionEvaluate top holds rows ``[-1, label, num_pos, -1, -1]`` (ground-truth count
of a label in the batch) and ``[item_id, label, score, tp, fp]`` (one detection). Over all
batches, per label: the positives are summed; detections with tp = fp = 0 (matched to an
ignored difficult box) are dropped; the rest are sorted by score (descending, stable in
arrival order) and the cumulative TP/FP give precision and recall, from which ``ComputeAP``
(``bbox_util.cpp``) derives the AP:

* ``11point`` (VOC2007; what Intel Caffe's ``caffe test -detection`` always uses): the mean
  over recall thresholds 0, 0.1, ..., 1 of the best precision at a recall >= the threshold;
* ``MaxIntegral`` (VOC2012 / ILSVRC): the area under the precision envelope;
* ``Integral``: the area under the raw precision/recall curve.

Arithmetic is float32 as in Caffe, including its 11-point loop (which, when a recall
threshold is never crossed, forgets the precisions above the previous threshold).

The mean: Caffe divides the sum of APs by the number of labels that appeared in num_pos rows,
i.e. every label but the background, *including labels without ground truth* (their AP is 0):
``classes="all"``, the default, reproduces that number. ``classes="with_gt"`` averages over
the labels with at least one (counted) ground-truth box, the usual VOC convention; the two
agree whenever every label has ground truth.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from calibrator.errors import CalibratorError

F32 = np.float32
AP_VERSIONS = ("11point", "MaxIntegral", "Integral")
_EPS = F32(1e-6)


def _check_version(ap_version: str) -> None:
    if ap_version not in AP_VERSIONS:
        raise CalibratorError(f"unknown ap_version {ap_version!r} (use one of "
                              f"{', '.join(AP_VERSIONS)})")


def _sequential_sum(terms: np.ndarray) -> F32:
    """``ap += term`` in float32, one term after another (numpy's sum is pairwise)."""
    if terms.size == 0:
        return F32(0)
    return np.cumsum(terms.astype(F32), dtype=F32)[-1]


def precision_recall(scores, tp, fp, num_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's cumulative precision and recall (float32) after a stable sort by score."""
    scores = np.asarray(scores, F32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    tp_cum = np.cumsum(np.asarray(tp, np.int64).reshape(-1)[order])
    fp_cum = np.cumsum(np.asarray(fp, np.int64).reshape(-1)[order])
    prec = tp_cum.astype(F32) / (tp_cum + fp_cum).astype(F32)
    rec = tp_cum.astype(F32) / F32(num_pos)
    return prec, rec


def compute_ap(scores, tp, fp, num_pos: int, ap_version: str = "11point") -> float:
    """Caffe-SSD's ``ComputeAP`` for one label: detections' scores and 0/1 tp, fp flags (in
    arrival order) against ``num_pos`` ground-truth boxes. 0 without detections or positives."""
    _check_version(ap_version)
    scores = np.asarray(scores, F32).reshape(-1)
    num = scores.size
    if num == 0 or num_pos == 0:
        return 0.0
    if int(np.asarray(tp, np.int64).sum()) > num_pos:
        raise CalibratorError(f"more true positives than the {num_pos} ground-truth boxes")
    prec, rec = precision_recall(scores, tp, fp, num_pos)
    if ap_version == "11point":
        rec64 = rec.astype(np.float64)  # Caffe compares float recall with double j/10.
        max_precs = np.zeros(11, F32)
        start = num - 1
        for j in range(10, -1, -1):
            # scanning down from `start`, precisions count while rec >= j/10
            first = int(np.searchsorted(rec64[:start + 1], j / 10.0, side="left"))
            if first <= start:
                max_precs[j] = max(max_precs[j], prec[first:start + 1].max())
            if first > 0:  # the scan stopped below the threshold: carry the max down
                start = first - 1
                if j > 0:
                    max_precs[j - 1] = max_precs[j]
        return float(_sequential_sum(max_precs[::-1] / F32(11)))
    if ap_version == "MaxIntegral":
        envelope = np.maximum.accumulate(prec[::-1])[::-1]  # max precision from i on
        step = np.abs(rec[1:] - rec[:-1])  # |cur_rec - rec[i]|, cur_rec = rec[i + 1]
        terms = np.where(step > _EPS, envelope[:-1] * step, F32(0))[::-1]
        return float(_sequential_sum(np.append(terms, rec[0] * envelope[0])))
    step = np.abs(rec - np.concatenate([[F32(0)], rec[:-1]]).astype(F32))  # Integral
    return float(_sequential_sum(np.where(step > _EPS, prec * step, F32(0))))


class DetectionAccumulator:
    """DetectionEvaluate outputs of many batches -> per-label AP and the mAP, as Caffe sums
    them over the iterations of ``caffe test -detection``."""

    def __init__(self):
        self.num_pos: dict[int, int] = {}
        self._chunks: list[np.ndarray] = []  # detection rows (label, score, tp, fp)

    def add(self, rows) -> None:
        """One batch's DetectionEvaluate top (any shape ending in 5; torch or numpy)."""
        if hasattr(rows, "detach"):
            rows = rows.detach().cpu().numpy()
        rows = np.asarray(rows, F32)
        if rows.size % 5:
            raise CalibratorError(f"a DetectionEvaluate output has rows of 5 values, got "
                                  f"shape {rows.shape}")
        rows = rows.reshape(-1, 5)
        items = rows[:, 0].astype(np.int64)
        labels = rows[:, 1].astype(np.int64)
        header = items == -1
        for label, count in zip(labels[header].tolist(),
                                rows[header, 2].astype(np.int64).tolist()):
            self.num_pos[label] = self.num_pos.get(label, 0) + count
        det = rows[~header]
        tp = det[:, 3].astype(np.int64)
        fp = det[:, 4].astype(np.int64)
        keep = (tp != 0) | (fp != 0)
        if keep.any():
            self._chunks.append(np.stack([labels[~header][keep].astype(F32), det[keep, 2],
                                          tp[keep].astype(F32), fp[keep].astype(F32)], 1))

    def detections(self, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, tp, fp) of one label's counted detections, in arrival order."""
        if not self._chunks:
            empty = np.zeros(0, F32)
            return empty, empty.astype(np.int64), empty.astype(np.int64)
        rows = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks = [rows]
        mine = rows[rows[:, 0].astype(np.int64) == label]
        return mine[:, 1], mine[:, 2].astype(np.int64), mine[:, 3].astype(np.int64)

    def average_precisions(self, ap_version: str = "11point") -> dict[int, float]:
        """AP of every label that had a num_pos row, in label order (0 without detections)."""
        _check_version(ap_version)
        return {label: compute_ap(*self.detections(label), self.num_pos[label], ap_version)
                for label in sorted(self.num_pos)}

    def mean_ap(self, ap_version: str = "11point", classes: str = "all") -> float:
        """Caffe's mAP (``classes="all"``: over every label with a num_pos row), or the mean
        over labels with ground truth (``classes="with_gt"``). 0 when nothing was added."""
        if classes not in ("all", "with_gt"):
            raise CalibratorError(f"classes must be 'all' or 'with_gt', got {classes!r}")
        aps = self.average_precisions(ap_version)
        if classes == "with_gt":
            aps = {k: v for k, v in aps.items() if self.num_pos[k] > 0}
        if not aps:
            return 0.0
        total = F32(0)
        for value in aps.values():  # Caffe: float mAP += AP, label by label
            total = F32(total + F32(value))
        return float(total / F32(len(aps)))


def detection_map(outputs_per_batch: Iterable, ap_version: str = "11point", *,
                  classes: str = "all") -> float:
    """The mAP ``caffe test -detection`` prints for one DetectionEvaluate output blob, from
    that blob's value in every batch (arrays or tensors of rows of 5, in batch order). An
    item may also be a mapping of blob names to values holding exactly one such blob."""
    acc = DetectionAccumulator()
    for value in outputs_per_batch:
        if isinstance(value, Mapping):
            if len(value) != 1:
                raise CalibratorError("detection_map: pass one DetectionEvaluate blob per "
                                      f"batch, got {sorted(value)}")
            (value,) = value.values()
        acc.add(value)
    return acc.mean_ap(ap_version, classes)
