"""``DIRECT``: T = max|x| over the calibration batches (Intel's default estimator)."""

from __future__ import annotations

from calibrator.quant.estimators.base import Estimator


class Direct(Estimator):
    name = "DIRECT"
    description = "max |x|"
