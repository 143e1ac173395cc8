"""BatchNorm/Scale folded into the preceding Convolution or InnerProduct, as Intel Caffe
does before running INT8: W' = W * a, b' = b * a + c for the per-channel affine y = a*x + c
of each folded layer."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from calibrator.quant.fusion import FusedGraph, FusedUnit

T = TypeVar("T")


def folded_weights(unit: FusedUnit, bias_shift=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the unit's layer with its BatchNorm/Scale folded in (float32);
    ``bias_shift`` (per output channel, bias correction) is added to the folded bias."""
    weight, bias = unit.layer.module.weight_bias()
    weight = weight.detach().float()
    bias = (torch.zeros(weight.shape[0], device=weight.device) if bias is None
            else bias.detach().float())
    for node in unit.folded:
        multiplier, offset = node.module.channel_affine()
        multiplier = multiplier.to(weight.device).float()
        offset = offset.to(weight.device).float()
        weight = weight * multiplier.reshape((-1,) + (1,) * (weight.dim() - 1))
        bias = bias * multiplier + offset
    if bias_shift is not None:
        bias = bias + torch.as_tensor(bias_shift, dtype=torch.float32, device=bias.device)
    return weight, bias


def weights_version(unit: FusedUnit) -> tuple:
    """What :func:`folded_weights` reads, as (identity, version) of every tensor of the
    unit's layer and folded layers: equal only while none of them was replaced or changed
    in place (a cache of anything computed from the folded weights keys on it). Read from
    the modules' own tables: ``parameters()`` and ``buffers()`` give the same tensors
    through generators that cost a -l search a quarter second (4,500 calls)."""
    return tuple((id(t), t._version) for node in (unit.layer, *unit.folded)
                 for module in _with_submodules(node.module)
                 for table in (module._parameters, module._buffers)
                 for t in table.values() if t is not None)


def _with_submodules(module: torch.nn.Module):
    """``module`` and its submodules (as ``parameters()`` walks them)."""
    return (module,) if not module._modules else tuple(module.modules())


def while_unchanged(cache: dict, key, unit: FusedUnit, compute: Callable[[], T]) -> T:
    """``compute()``, kept in ``cache[key]`` while ``unit``'s weights stay the same (its
    :func:`weights_version`), computed again once they change."""
    version = weights_version(unit)
    cached = cache.get(key)
    if cached is None or cached[0] != version:
        cached = cache[key] = (version, compute())
    return cached[1]


def folded_once(fused: FusedGraph, unit: FusedUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`folded_weights` of ``unit``, computed once per fused graph while its weights
    stay the same (every simulator of a search runs its FP32 units with them)."""
    return while_unchanged(fused.folded, unit.name, unit, lambda: folded_weights(unit))
