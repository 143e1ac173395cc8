"""An ncnn model in memory: the layer list a ``.param`` file holds, with the arrays of the
``.bin`` file, plus where each layer came from in the Caffe graph.

Mirrors ncnn's own in-memory form during conversion (tools/modelwriter.h ``ModelWriter``):
layers in file order, blobs by name, a layer removed by an optimization pass is marked
``fused`` and skipped when written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: ncnn layer types whose weights ncnn2int8 quantizes (tools/quantize/ncnn2int8.cpp)
CONV_TYPES = ("Convolution", "ConvolutionDepthWise")
INT8_TYPES = CONV_TYPES + ("InnerProduct",)
#: layers with a weight blob, a bias, fused activation (param 9/10)
WEIGHTED_TYPES = INT8_TYPES + ("Deconvolution", "DeconvolutionDepthWise")


@dataclass
class Int8Weights:
    """What ncnn2int8 stores for one layer: int8 weights and its scales (float32)."""

    weight: np.ndarray                  # int8, ncnn layout, flattened
    weight_scales: np.ndarray           # per output channel (per group for depthwise)
    bottom_scale: np.float32
    top_scale: np.float32 | None = None  # set by fuse_requantize: int8 output


@dataclass
class NcnnLayer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, object] = field(default_factory=dict)
    #: raw float32 arrays written after each other (non-weighted layers)
    arrays: list[np.ndarray] = field(default_factory=list)
    #: Caffe node indices this layer computes (the first is its main node)
    nodes: list[int] = field(default_factory=list)
    #: weighted layers: float32 weights in ncnn order (flattened), bias or None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    activation_type: int = 0
    activation_params: list[float] = field(default_factory=list)
    int8: Int8Weights | None = None
    #: store a float weight as fp16 (ncnn2int8's storage_type = 1)
    fp16_weight: bool = False
    fused: bool = False

    @property
    def weighted(self) -> bool:
        return self.type in WEIGHTED_TYPES

    @property
    def int8_scale_term(self) -> int:
        """Param 8: 2 for per-channel Convolution/InnerProduct, 1 for ConvolutionDepthWise
        (one scale per group), +100 when the output is requantized to int8."""
        if self.int8 is None:
            return 0
        term = 1 if self.type == "ConvolutionDepthWise" else 2
        return term + (100 if self.int8.top_scale is not None else 0)

    @property
    def group(self) -> int:
        return int(self.params.get(7, 1))


@dataclass
class NcnnGraph:
    layers: list[NcnnLayer]
    #: Caffe blob (its last version) -> ncnn blob name, for the net's inputs and outputs
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    #: Caffe blob version "node:blob" (node -1: fed from outside) -> ncnn blob name
    blob_of_version: dict[str, str] = field(default_factory=dict)

    def live(self) -> list[NcnnLayer]:
        return [layer for layer in self.layers if not layer.fused]

    def producer(self, blob: str) -> NcnnLayer | None:
        for layer in self.live():
            if blob in layer.tops:
                return layer
        return None

    def consumers(self, blob: str) -> list[NcnnLayer]:
        return [layer for layer in self.live() if blob in layer.bottoms]

    def layer(self, name: str) -> NcnnLayer:
        for layer in self.live():
            if layer.name == name:
                return layer
        raise KeyError(name)

    def blob_names(self) -> list[str]:
        names: dict[str, None] = {}
        for layer in self.live():
            for blob in layer.bottoms + layer.tops:
                names[blob] = None
        return list(names)
