"""calibrator: accuracy-driven INT8 post-training calibration for Caffe models."""

__version__ = "0.1.0"
