"""``map``: the mAP of a DetectionEvaluate top, as ``caffe test -detection`` reports it: the
rows of every batch accumulated, then the mean AP over the classes by ``ap_version``
(11point, MaxIntegral or Integral).

Caffe-SSD has no ``ap_version`` on the DetectionEvaluate layer: ``caffe test`` takes it from
its ``-ap_version`` flag (default 11point) and training from the solver. So it is an option
here too (``--ap-version`` on every command, ``ap_version`` in a gate config), with the same
default."""

from __future__ import annotations

from calibrator.detection.map import AP_VERSIONS, DetectionAccumulator
from calibrator.errors import CalibratorError
from calibrator.graph.layers.detection_evaluate import reset_state
from calibrator.metrics.base import BatchOutcome, Metric

DEFAULT_AP_VERSION = "11point"  # caffe test -ap_version's default

class DetectionMAP(Metric):
    description = "a DetectionEvaluate top: mAP over all batches (the layer's ap_version)"

    def __init__(self, net, blob: str, version: str | None = None):
        producers = net.writers(blob)
        if not producers or producers[-1].type != "DetectionEvaluate":
            raise CalibratorError(f"metric '{blob}' (kind map) is not a DetectionEvaluate top")
        self.blob = blob
        self.node = producers[-1]
        self.ap_version = version or DEFAULT_AP_VERSION
        if self.ap_version not in AP_VERSIONS:
            raise CalibratorError(f"unknown ap_version '{self.ap_version}' (use one of "
                                  f"{', '.join(AP_VERSIONS)})")
        # the detection heads the sensitivity probe compares (DetectionOutput's loc, conf)
        feeding = net.writers(self.node.bottoms[0])
        detection_output = feeding[-1] if feeding else None
        self.heads = (list(detection_output.bottoms[:2])
                      if detection_output is not None and detection_output.type ==
                      "DetectionOutput" else [self.node.bottoms[0]])

    def start(self, net) -> None:
        reset_state(net)  # DetectionEvaluate counts images for its name/size file

    def read(self, outputs) -> BatchOutcome:
        rows = outputs[self.blob].detach().cpu().numpy()
        return BatchOutcome(float("nan"), None, rows)

    def combine(self, batches) -> float:
        accumulator = DetectionAccumulator()
        for batch in batches:
            accumulator.add(batch.extra)
        return accumulator.mean_ap(self.ap_version)
