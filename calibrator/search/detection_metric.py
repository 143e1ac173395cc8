"""mAP as the search metric (``-d 1``): DetectionEvaluate rows of every batch accumulated,
then the mean AP over classes, as ``caffe test -detection`` reports it."""

from __future__ import annotations

from calibrator.detection.map import DetectionAccumulator
from calibrator.search.metric import BatchOutcome, Metric


class DetectionMetric(Metric):
    def __init__(self, net, blob: str, node):
        self.blob = blob
        self.node = node
        param = node.param.detection_evaluate_param
        self.ap_version = "11point"
        if "ap_version" in param.DESCRIPTOR.fields_by_name and param.HasField("ap_version"):
            self.ap_version = param.ap_version
        # the detection heads the sensitivity probe compares (DetectionOutput's loc, conf)
        producers = [n for n in net.nodes if node.bottoms[0] in n.tops]
        detection_output = producers[-1] if producers else None
        self.heads = (list(detection_output.bottoms[:2])
                      if detection_output is not None and detection_output.type ==
                      "DetectionOutput" else [node.bottoms[0]])

    def start(self, net) -> None:
        from calibrator.graph.layers.detection_evaluate import reset_state

        reset_state(net)  # DetectionEvaluate counts images for its name/size file

    def read(self, outputs) -> BatchOutcome:
        rows = outputs[self.blob].detach().cpu().numpy()
        return BatchOutcome(float("nan"), None, rows)

    def combine(self, batches) -> float:
        accumulator = DetectionAccumulator()
        for batch in batches:
            accumulator.add(batch.extra)
        return accumulator.mean_ap(self.ap_version)
