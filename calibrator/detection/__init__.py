"""SSD detection evaluation: Caffe-SSD's DetectionEvaluate matching, the mAP of
``caffe test -detection``, AnnotatedDatum LMDBs (``make-annoset``) and deploy-net wiring.

Modules: :mod:`~calibrator.detection.matching` (per-image TP/FP as DetectionEvaluate does),
:mod:`~calibrator.detection.map` (AP/mAP over all iterations), :mod:`~calibrator.detection.annoset`
(VOC XML lists, label maps, the LMDB writer), :mod:`~calibrator.detection.deploy` (a TEST net
with a list data layer and a DetectionEvaluate layer from a deploy net).
"""

from calibrator.detection.map import (AP_VERSIONS, DetectionAccumulator, compute_ap,
                                      detection_map)

__all__ = ["AP_VERSIONS", "DetectionAccumulator", "compute_ap", "detection_map"]
