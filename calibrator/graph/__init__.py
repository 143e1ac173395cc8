"""The FP32 graph: a Caffe net as a PyTorch module that reproduces Caffe's results.

:mod:`~calibrator.graph.layer` holds the layer contract and registry, ``layers/`` one small
module per Caffe layer type (importing this package registers them all), and
:mod:`~calibrator.graph.net` the runnable :class:`CaffeNet`."""

from calibrator.graph import layers  # noqa: F401  (registers every layer type)
from calibrator.graph.layer import Layer, layer_class, register
from calibrator.graph.net import CaffeNet, Node

__all__ = ["CaffeNet", "Layer", "Node", "layer_class", "register"]
