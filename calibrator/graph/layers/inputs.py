"""Layers with no bottoms that start a net: Input (fed by the runner) and DummyData."""

from __future__ import annotations

import numpy as np
import torch

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import check_io


def _per_top(layer: Layer, values: list, num_tops: int, what: str) -> list:
    """Caffe's rule for per-top settings: one value for every top, or exactly one per top."""
    if len(values) == 1:
        return values * num_tops
    if len(values) != num_tops:
        raise layer.error(f"give one {what} or one per top ({num_tops}), got {len(values)}")
    return values


@register("Input")
class Input(Layer):
    """Declares the net's inputs. The runner feeds the tops, so ``forward`` is never called;
    :meth:`input_shapes` gives the declared shape of each top."""

    is_input = True

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (0, 0), (1, None))
        shapes = [tuple(s.dim) for s in param.input_param.shape]
        # No shape at all is legal in Caffe: the caller reshapes the input before running.
        self.shapes = _per_top(self, shapes, len(param.top), "shape") if shapes else \
            [None] * len(param.top)

    def input_shapes(self) -> list[tuple[int, ...] | None]:
        """The declared shape of each top, None where the prototxt declares none."""
        return list(self.shapes)

    def forward(self, *bottoms):
        raise self.error("Input tops are fed by the runner, not computed")


@register("DummyData")
class DummyData(Layer):
    """Constant-filled tops of declared shapes. Random fillers are refused: a deploy net that
    depends on them would not give reproducible results."""

    is_input = True

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (0, 0), (1, None))
        dp = param.dummy_data_param
        num_tops = len(param.top)
        legacy = [list(dp.num), list(dp.channels), list(dp.height), list(dp.width)]
        if any(legacy):
            if len(dp.shape):
                raise self.error("give shape or num/channels/height/width, not both")
            columns = [_per_top(self, v, num_tops, "num/channels/height/width")
                       for v in legacy]
            self.shapes = [tuple(dims) for dims in zip(*columns)]
        else:
            self.shapes = _per_top(self, [tuple(s.dim) for s in dp.shape], num_tops, "shape")
        fillers = list(dp.data_filler)
        if not fillers:
            self.values = [0.0] * num_tops
        else:
            fillers = _per_top(self, fillers, num_tops, "data_filler")
            for filler in fillers:
                if filler.type != "constant":
                    raise self.error(f"only constant fillers are supported, got '{filler.type}'")
            self.values = [float(np.float32(f.value)) for f in fillers]
        # A buffer only so that the tops follow the module to its device.
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def input_shapes(self) -> list[tuple[int, ...]]:
        return list(self.shapes)

    def forward(self) -> tuple[torch.Tensor, ...]:
        device = self._device_anchor.device
        return tuple(torch.full(shape, value, dtype=torch.float32, device=device)
                     for shape, value in zip(self.shapes, self.values))
