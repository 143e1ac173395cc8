"""Which layers a phase runs: Caffe's include/exclude NetStateRule filtering (FilterNet)."""

from __future__ import annotations

from typing import Iterable

from calibrator.caffe import caffe_pb2

TEST = caffe_pb2.TEST
TRAIN = caffe_pb2.TRAIN


def make_state(net, phase=TEST, stages: Iterable[str] = (), level: int | None = None):
    """The NetState Caffe would use: the net's own ``state`` overridden by the caller."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    state.phase = phase
    if level is not None:
        state.level = level
    state.stage.extend(s for s in stages if s not in state.stage)
    return state


def rule_met(state, rule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(stage not in state.stage for stage in rule.stage):
        return False
    if any(stage in state.stage for stage in rule.not_stage):
        return False
    return True


def layer_included(layer, state) -> bool:
    if len(layer.include):
        return any(rule_met(state, rule) for rule in layer.include)
    return not any(rule_met(state, rule) for rule in layer.exclude)


def filter_net(net, phase=TEST, stages: Iterable[str] = (), level: int | None = None):
    """A copy of ``net`` holding only the layers the given phase/stages/level run."""
    state = make_state(net, phase, stages, level)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    out.layer.extend(layer for layer in net.layer if layer_included(layer, state))
    out.state.CopyFrom(state)
    return out
