"""INT8 calibration: the fused view, statistics, range estimators, scales, simulation."""
