"""Layers that only move data around: Concat, Slice, Split, Flatten, Reshape, Permute, Crop,
ShuffleChannel, Tile, and the test-time no-ops Dropout and Silence.

Shapes that depend on the batch size are recomputed from the actual bottoms in ``forward``;
``__init__`` applies Caffe's checks to the declared shapes so a bad prototxt fails early.
"""

from __future__ import annotations

import numpy as np
import torch

from calibrator.graph.layer import Layer, register
from calibrator.graph.layers._common import (canonical_axis, check_io, count, field_or,
                                             sub_param)


def _axis_or_legacy(layer: Layer, message, legacy: str, num_axes: int) -> int:
    """Concat and Slice accept ``axis`` or the older non-negative ``*_dim``, not both."""
    if message.HasField("axis") and message.HasField(legacy):
        raise layer.error(f"give either axis or {legacy}, not both")
    if message.HasField(legacy):
        axis = getattr(message, legacy)
        if axis >= num_axes:
            raise layer.error(f"{legacy} {axis} out of range for a {num_axes}-D bottom")
        return axis
    return canonical_axis(layer, message.axis, num_axes)


@register("Concat")
class Concat(Layer):
    """Bottoms joined along ``axis``; all other dimensions must agree."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, None), (1, 1))
        first = self.bottom_shapes[0]
        self.axis = _axis_or_legacy(self, param.concat_param, "concat_dim", len(first))
        for shape in self.bottom_shapes[1:]:
            if len(shape) != len(first) or any(
                    a != b for i, (a, b) in enumerate(zip(shape, first)) if i != self.axis):
                raise self.error(f"bottom shapes {self.bottom_shapes} differ outside "
                                 f"axis {self.axis}")

    def top_shapes(self):
        first = list(self.bottom_shapes[0])
        first[self.axis] = sum(shape[self.axis] for shape in self.bottom_shapes)
        return [tuple(first)]

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor]:
        if len(bottoms) == 1:
            return (bottoms[0],)
        return (torch.cat(bottoms, dim=self.axis),)


@register("Slice")
class Slice(Layer):
    """The bottom cut along ``axis`` at ``slice_point``s, or into equal parts, one per top."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, None))
        sp = param.slice_param
        shape = self.bottom_shapes[0]
        self.axis = _axis_or_legacy(self, sp, "slice_dim", len(shape))
        length, num_tops = shape[self.axis], len(param.top)
        points = list(sp.slice_point)
        if points:
            if len(points) != num_tops - 1:
                raise self.error(f"{len(points)} slice points for {num_tops} tops; "
                                 f"need one fewer points than tops")
            bounds = [0] + points + [length]
            self.sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            if min(self.sizes) <= 0:
                raise self.error(f"slice points {points} must increase strictly within "
                                 f"(0, {length})")
        else:
            if length % num_tops:
                raise self.error(f"axis {self.axis} of size {length} does not split into "
                                 f"{num_tops} equal parts")
            self.sizes = [length // num_tops] * num_tops

    def top_shapes(self):
        shape = self.bottom_shapes[0]
        return [shape[:self.axis] + (size,) + shape[self.axis + 1:] for size in self.sizes]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.sizes) == 1:
            return (x,)
        return tuple(part.contiguous() for part in torch.split(x, self.sizes, dim=self.axis))


@register("Split")
class Split(Layer):
    """The same bottom under several names; the tensor is shared, not copied."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, None))
        self.num_outputs = len(param.top)

    def top_shapes(self):
        return [self.bottom_shapes[0]] * self.num_outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,) * self.num_outputs


@register("Flatten")
class Flatten(Layer):
    """Axes ``axis`` to ``end_axis`` (inclusive) merged into one."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        ndim = len(self.bottom_shapes[0])
        self.start = canonical_axis(self, param.flatten_param.axis, ndim)
        self.end = canonical_axis(self, param.flatten_param.end_axis, ndim)
        if self.end < self.start:
            raise self.error(f"end_axis {self.end} is before axis {self.start}")

    def top_shapes(self):
        shape = self.bottom_shapes[0]
        return [shape[:self.start] + (count(shape, self.start, self.end + 1),)
                + shape[self.end + 1:]]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.flatten(x, self.start, self.end),)


@register("Reshape")
class Reshape(Layer):
    """Axes [axis, axis + num_axes) replaced by ``shape``, where 0 copies the bottom's
    dimension at the same position and a single -1 takes whatever count is left."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        rp = param.reshape_param
        self.dims = list(rp.shape.dim)
        if self.dims.count(-1) > 1:
            raise self.error("at most one -1 may be given in the new shape")
        if any(d < -1 for d in self.dims):
            raise self.error(f"invalid dimension in new shape {self.dims}")
        self.axis, self.num_axes = rp.axis, rp.num_axes
        if self.num_axes < -1:
            raise self.error("num_axes must be >= 0, or -1 for all")
        self.top_shape(self.bottom_shapes[0])

    def top_shape(self, bottom: tuple[int, ...]) -> tuple[int, ...]:
        ndim = len(bottom)
        start = self.axis if self.axis >= 0 else ndim + self.axis + 1
        if not 0 <= start <= ndim:
            raise self.error(f"axis {self.axis} out of range for a {ndim}-D bottom")
        end = ndim if self.num_axes == -1 else start + self.num_axes
        if end > ndim:
            raise self.error(f"axis + num_axes = {end} is beyond the {ndim}-D bottom")
        top = list(bottom[:start]) + list(self.dims) + list(bottom[end:])
        for i, dim in enumerate(self.dims):
            if dim == 0:
                if start + i >= ndim:
                    raise self.error(f"new shape has a 0 at position {i}, but the bottom has no "
                                     f"axis {start + i} to copy")
                top[start + i] = bottom[start + i]
        if -1 in self.dims:
            inferred = start + self.dims.index(-1)
            known = count(top[:inferred]) * count(top[inferred + 1:])
            if known == 0 or count(bottom) % known:
                raise self.error(f"bottom count {count(bottom)} is not divisible by the "
                                 f"given dimensions' product {known}")
            top[inferred] = count(bottom) // known
        if count(top) != count(bottom):
            raise self.error(f"new shape {tuple(top)} does not hold the bottom's "
                             f"{count(bottom)} values (bottom shape {tuple(bottom)})")
        return tuple(top)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x.reshape(self.top_shape(tuple(x.shape))),)


@register("Permute")
class Permute(Layer):
    """SSD's axis permutation; axes missing from ``order`` follow in their original order."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        ndim = len(self.bottom_shapes[0])
        order = list(sub_param(self, param, "permute_param").order)
        if any(o >= ndim for o in order):
            raise self.error(f"order {order} names an axis beyond the {ndim}-D bottom")
        if len(set(order)) != len(order):
            raise self.error(f"order {order} repeats an axis")
        self.order = tuple(order + [i for i in range(ndim) if i not in order])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        if self.order == tuple(range(x.dim())):
            return (x,)
        return (x.permute(self.order).contiguous(),)


@register("Crop")
class Crop(Layer):
    """bottom[0] cut to bottom[1]'s size on every axis from ``axis`` on, starting at
    ``offset`` (one value for all cropped axes, or one per axis)."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (2, 2), (1, 1))
        cp = param.crop_param
        ndim = len(self.bottom_shapes[0])
        self.axis = canonical_axis(self, cp.axis, ndim)
        offsets = list(cp.offset)
        if len(offsets) > 1 and self.axis + len(offsets) != ndim:
            raise self.error(f"{len(offsets)} offsets for the {ndim - self.axis} axes "
                             f"from axis {self.axis}")
        cropped = ndim - self.axis
        self.offsets = (offsets or [0]) * cropped if len(offsets) <= 1 else offsets
        self.check_bounds(self.bottom_shapes[0], self.bottom_shapes[1])

    def check_bounds(self, data_shape, reference_shape):
        if len(reference_shape) < len(data_shape):
            raise self.error(f"reference shape {tuple(reference_shape)} has fewer axes "
                             f"than {tuple(data_shape)}")
        for i, offset in enumerate(self.offsets, start=self.axis):
            if data_shape[i] - offset < reference_shape[i]:
                raise self.error(f"crop of axis {i} to size {reference_shape[i]} at offset "
                                 f"{offset} is out of bounds for size {data_shape[i]}")

    def forward(self, x: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor]:
        self.check_bounds(x.shape, reference.shape)
        index = [slice(None)] * self.axis + [
            slice(offset, offset + reference.shape[i])
            for i, offset in enumerate(self.offsets, start=self.axis)]
        return (x[tuple(index)].contiguous(),)


@register("ShuffleChannel")
class ShuffleChannel(Layer):
    """ShuffleNet's channel shuffle: channel g * (C / group) + j moves to j * group + g."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        shape = self.bottom_shapes[0]
        self.group = sub_param(self, param, "shuffle_channel_param").group
        if len(shape) < 2 or self.group <= 0 or shape[1] % self.group:
            raise self.error(f"group {self.group} must divide the channels of {shape}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.group, c // self.group, *x.shape[2:])
        return (grouped.transpose(1, 2).reshape(x.shape),)


@register("Tile")
class Tile(Layer):
    """The block of axes from ``axis`` on repeated ``tiles`` times along ``axis``."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        tp = param.tile_param
        self.axis = canonical_axis(self, tp.axis, len(self.bottom_shapes[0]))
        self.tiles = tp.tiles
        if self.tiles <= 0:
            raise self.error("tiles must be positive")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        repeats = [1] * x.dim()
        repeats[self.axis] = self.tiles
        return (x.repeat(repeats),)


@register("Dropout")
class Dropout(Layer):
    """Identity at test time. Forks with ``scale_train: false`` scale by (1 - ratio) instead
    of scaling during training."""
    keeps_shape = True

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, 1), (1, 1))
        dp = param.dropout_param
        ratio = np.float32(dp.dropout_ratio)
        if not 0 <= ratio < 1:
            raise self.error(f"dropout_ratio must be in [0, 1), got {ratio}")
        scale_train = field_or(dp, "scale_train", True)
        self.test_scale = 1.0 if scale_train else float(np.float32(1) - ratio)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x if self.test_scale == 1 else x * self.test_scale,)


@register("Silence")
class Silence(Layer):
    """Consumes its bottoms so Caffe does not print them; produces nothing."""

    def __init__(self, param, bottom_shapes):
        super().__init__(param, bottom_shapes)
        check_io(self, param, (1, None), (0, 0))

    def forward(self, *bottoms: torch.Tensor) -> tuple[()]:
        return ()
