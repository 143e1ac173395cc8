"""``accuracy``: the top of an Accuracy layer, with per-sample correctness from the layer
itself (so evaluations can be compared image by image and stopped early)."""

from __future__ import annotations

from calibrator.errors import CalibratorError
from calibrator.metrics.base import BatchOutcome, Metric


def primary_accuracy_layer(layers):
    """The Accuracy layer with the smallest top_k (Intel's default metric), or None.

    ``layers``: LayerParameters in prototxt order."""
    best = None
    for layer in layers:
        if layer.type == "Accuracy" and len(layer.top) and len(layer.bottom):
            if best is None or layer.accuracy_param.top_k < best.accuracy_param.top_k:
                best = layer
    return best


class AccuracyMetric(Metric):
    description = "an Accuracy top: share of correct images, per image"
    class_scores = True

    def __init__(self, net, blob: str):
        producers = net.writers(blob)
        if not producers or producers[-1].type != "Accuracy" or producers[-1].tops[0] != blob:
            raise CalibratorError(f"-n {blob}: not the top of an Accuracy layer")
        self.blob = blob
        self.node = producers[-1]
        self.scores, self.label = self.node.bottoms[0], self.node.bottoms[1]

    def outputs(self) -> list[str]:
        return [self.blob, self.scores, self.label]

    def read(self, outputs):
        correct = self.node.module.per_sample(outputs[self.scores], outputs[self.label])
        return BatchOutcome(float(outputs[self.blob].float().reshape(-1)[0]),
                            correct.detach().cpu().numpy().astype(bool))
