"""Channel equalization (``--equalize``): each channel of a tensor that INT8 quantizes with
one per-tensor scale is rescaled, in the weights, towards the tensor's widest channel.

An Intel (or ncnn) INT8 activation has one scale for all its channels, so a channel whose
values span a tenth of the widest one's range gets a tenth of the integer levels. Where the
tensor is written by layers that scale each output channel (a Convolution, or the Scale
after its BatchNorm) and read only by Convolutions (and by sums, max, ReLU / leaky ReLU /
ReLU6 in place between them), channel ``i`` can be multiplied by ``s_i > 0`` in the
producers' weights and bias and divided back out of the consumers' weights: the net's
output is unchanged (Nagel et al. 2019, "Data-Free Quantization", cross-layer
equalization; here the factors balance activation ranges, measured on the calibration
images, as SmoothQuant does, Xiao et al. 2023). The tensors linked by an Eltwise (a
residual stream: every block's projection writes it, the next blocks' expansions read it)
share one factor per channel.

The factors: with ``r_i`` the largest ``|x_i|`` of channel ``i`` over every tensor of the
group on the calibration batches and ``R`` the largest ``r_i``, ``s_i = (R / r_i)^alpha``.
``alpha = 1`` (every channel to ``R``) where each consumer's output reads one input channel
(a depthwise convolution) and its weights are quantized per channel: the division lands in
that output channel's own weight scale, so it costs the weights nothing. Where a consumer
mixes channels (a 1x1 expansion or projection) the division also narrows those input
channels' weights against the others of the same output channel; ``alpha = 1/2`` shares the
range between the activation and the weights (SmoothQuant's default), and so does a
depthwise consumer with per-tensor weights. A channel below ``R * 1e-4`` (dead on these
images) keeps ``s_i = 1``.

ReLU6 is not scale-equivariant: after the rescaling its clip at 6 acts at ``6 / s_i`` in
the original units. ``s_i r_i <= R <= 6`` (a ReLU6's output) keeps that at or above the
channel's largest calibration value, and the factors are capped so that it holds for each
tensor a ReLU6 writes: the FP32 net is unchanged up to that value, and beyond it INT8
clips at the tensor's threshold anyway.

The rescaled weights are what the quantized prototxt's scales describe, so they reach the
runtime only through ``--weights-out`` (which also carries bias correction): the pipeline
runs ``--equalize`` only with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from calibrator import distributed
from calibrator.data.feed import batches
from calibrator.graph.layers.eltwise import Eltwise

#: a channel this far below the group's widest keeps its scale (dead on the calibration data)
DEAD = 1e-4
#: alpha where a consumer mixes channels (or its weights are per-tensor)
MIXING_ALPHA = 0.5
#: in-place readers that commute with a positive per-channel factor (ReLU6: see the module)
_HOMOGENEOUS = ("ReLU", "ReLU6")


@dataclass
class Group:
    """Tensors that share one factor per channel."""

    blobs: list[str]
    producers: list[str] = field(default_factory=list)   # Convolution or Scale layers
    consumers: list[str] = field(default_factory=list)   # Convolution layers
    clipped: list[str] = field(default_factory=list)     # blobs a ReLU6 writes
    channels: int = 0


def _union(nodes) -> dict[str, str]:
    """Blob name -> its group's root: the bottoms and top of every Eltwise SUM/MAX (a
    product is not homogeneous)."""
    parent: dict[str, str] = {}

    def find(name):
        while parent.get(name, name) != name:
            name = parent[name]
        return name
    for node in nodes:
        if node.type == "Eltwise" and node.module.operation != Eltwise.PROD:
            root = find(node.tops[0])
            for bottom in node.bottoms:
                parent[find(bottom)] = root
    return {name: find(name) for name in {b for n in nodes for b in (*n.bottoms, *n.tops)}}


def _channels_of(node, weights) -> int | None:
    """Output channels a producer scales (None: it cannot)."""
    blobs = weights.get(node.name)
    if not blobs:
        return None
    if node.type == "Convolution":
        return int(blobs[0].shape[0])
    if node.type == "Scale":
        param = node.param.scale_param
        if len(node.bottoms) != 1 or param.axis != 1 or param.num_axes != 1:
            return None
        return int(blobs[0].size)
    return None


def find_groups(net, weights: dict) -> list[Group]:
    """Every group of tensors ``net`` (a CaffeNet) can be equalized on, in network order."""
    root = _union(net.nodes)
    members: dict[str, list[str]] = {}
    for node in net.nodes:
        for top in node.tops:
            blobs = members.setdefault(root.get(top, top), [])
            if top not in blobs:
                blobs.append(top)
    groups = (_group(net, weights, key, blobs, root) for key, blobs in members.items())
    return [group for group in groups if group is not None]


def _group(net, weights, key, blobs, root) -> Group | None:
    """The group of ``blobs`` when every writer and reader allows the rescaling."""
    group = Group(blobs=list(blobs))
    inside = set(blobs)
    for blob in blobs:
        writers = net.writers(blob)
        in_place = [n for n in writers if n.type in _HOMOGENEOUS]
        if any(list(n.bottoms) != [blob] for n in in_place):
            return None
        main = [n for n in writers if n.type not in _HOMOGENEOUS]
        if not main:
            return None      # a net input
        last = main[-1]
        if last.type == "Eltwise":
            if any(b not in inside for b in last.bottoms):
                return None
        else:
            channels = _channels_of(last, weights)
            if channels is None or (group.channels and channels != group.channels):
                return None
            group.channels = channels
            group.producers.append(last.name)
        if any(n.type == "ReLU6" for n in in_place):
            group.clipped.append(blob)
        for reader in net.consumers(blob, after=last.index):
            if reader in in_place:
                continue
            if reader.type == "Eltwise" and root.get(reader.tops[0]) == key:
                continue
            if reader.type == "Convolution" and len(reader.bottoms) == 1 and \
                    weights.get(reader.name):
                if reader.name not in group.consumers:
                    group.consumers.append(reader.name)
                continue
            return None
    if not group.producers or not group.consumers or not group.channels:
        return None
    for name in group.consumers:
        if weights[name][0].ndim != 4 or \
                weights[name][0].shape[1] * net.node(name).module.group != group.channels:
            return None
    return group


def channel_ranges(model, groups: list[Group], iterations: int, quiet: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Blob name -> its largest |x| per channel (float64) on the first ``iterations``
    batches, for every tensor of ``groups`` (its final version, after an in-place
    activation): one FP32 pass, each tensor reduced where it is written. Under torchrun
    each rank reads its share of the batches and every rank gets the maxima of all of
    them (a maximum is exact in any order: the factors of one process)."""
    last_writer = {b: model.net.writers(b)[-1].index for g in groups for b in g.blobs}

    def one_batch(feeds) -> dict[str, torch.Tensor]:
        maxima: dict[str, torch.Tensor] = {}

        def hook(node, tops):  # each tensor once a batch: where its last writer writes it
            for top, value in zip(node.tops, tops):
                if last_writer.get(top) == node.index:
                    dims = [d for d in range(value.dim()) if d != 1]
                    maxima[top] = value.detach().abs().amax(dim=dims).double().cpu()
            return None

        model.net(feeds, outputs=[], hook=hook)
        return maxima

    def this_ranks_batches() -> dict[int, dict[str, torch.Tensor]]:
        with torch.no_grad():
            return {index: one_batch(feeds) for index, feeds in batches(
                model, iterations, desc="equalization ranges", quiet=quiet, shard=True)}

    maxima: dict[str, torch.Tensor] = {}
    for part in distributed.gather_batches(this_ranks_batches):
        for blob, m in part.items():
            maxima[blob] = m if blob not in maxima else torch.maximum(maxima[blob], m)
    return maxima


def factors(group: Group, maxima: dict, alpha: float) -> np.ndarray:
    """``s = (R / r)^alpha`` per channel (1 for a channel dead on the calibration data),
    capped where a ReLU6 writes a tensor of the group (see the module)."""
    r = torch.stack([maxima[b] for b in group.blobs]).amax(0).numpy()
    widest = float(r.max()) if r.size else 0.0
    if not (np.isfinite(widest) and widest > 0.0):   # all dead, or overflowing in FP32
        return np.ones(group.channels)
    s = np.where(r > widest * DEAD, (widest / np.maximum(r, 1e-300)) ** alpha, 1.0)
    for blob in group.clipped:
        own = maxima[blob].numpy()
        cap = np.where(own > 0, 6.0 / np.maximum(own, 1e-300), np.inf)
        s = np.minimum(s, np.maximum(cap, 1.0))
    return s


def alpha_of(group: Group, weights: dict, per_channel: bool) -> float:
    """1 where every consumer is depthwise (one input channel per output) with per-channel
    weights, else :data:`MIXING_ALPHA`."""
    depthwise = all(weights[name][0].shape[1] == 1 for name in group.consumers)
    return 1.0 if depthwise and per_channel else MIXING_ALPHA


def rescaled(weights: dict, net, groups: list[Group], scales: list[np.ndarray]) -> dict:
    """A copy of ``weights`` with each group's producers multiplied and consumers divided
    (``net``: the CaffeNet the groups were found on)."""
    out = {name: list(blobs) for name, blobs in weights.items()}
    for group, s in zip(groups, scales):
        for name in group.producers:
            blobs = [np.asarray(b, np.float64) for b in out[name]]
            shape = ((-1,) + (1,) * (blobs[0].ndim - 1)
                     if net.node(name).type == "Convolution" else blobs[0].shape)
            blobs[0] = blobs[0] * s.reshape(shape)
            if len(blobs) > 1:
                blobs[1] = blobs[1] * s.reshape(blobs[1].shape)
            out[name] = [b.astype(np.float32) for b in blobs]
        for name in group.consumers:
            w = np.asarray(out[name][0], np.float64)
            g = net.node(name).module.group
            o, cg = w.shape[0], w.shape[1]
            w = w.reshape(g, o // g, cg, *w.shape[2:]) / s.reshape(g, 1, cg, 1, 1)
            out[name] = [w.reshape(o, cg, *w.shape[3:]).astype(np.float32)] + list(
                out[name][1:])
    return out


@dataclass
class Equalization:
    """What ``equalize`` did: the groups, their factors, and the rescaled weights."""

    groups: list[Group]
    scales: list[np.ndarray]
    weights: dict

    def record(self) -> dict:
        """The JSON record's entry."""
        return {"groups": [{"tensors": g.blobs, "producers": g.producers,
                            "consumers": g.consumers, "channels": g.channels,
                            "largest_factor": round(float(s.max()), 4),
                            "median_factor": round(float(np.median(s)), 4)}
                           for g, s in zip(self.groups, self.scales)]}


def equalize(model, iterations: int, per_channel: bool, quiet: bool = False) -> Equalization:
    """The equalization of ``model`` (a calibrator.model.Model) on its first ``iterations``
    calibration batches."""
    groups = find_groups(model.net, model.weights)
    maxima = channel_ranges(model, groups, iterations, quiet=quiet) if groups else {}
    scales = [factors(g, maxima, alpha_of(g, model.weights, per_channel)) for g in groups]
    return Equalization(groups, scales, rescaled(model.weights, model.net, groups, scales))
