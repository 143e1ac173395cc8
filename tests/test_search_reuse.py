"""Evaluations resumed at a cut from an earlier plan's blobs (``calibrator.search.reuse``):
the outputs are those of the whole pass, bit for bit, and a resume happens exactly where
the two plans agree on every unit before the cut."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from calibrator.backends import make_backend
from calibrator.search.reuse import PrefixReuse, live_blobs, prefix_fingerprint, valid_cuts
from tests.quant_helpers import TinyNet, conv_text, input_text, relu_text
from tests.test_quant_native import RESIDUAL_NET, bits

#: a residual unit (c2 with the add and its ReLU), a ReLU6, and two units after them
NET = RESIDUAL_NET + relu_text("r4", "c4") + conv_text("c5", "c4", "c5", 4, kernel=1)


@pytest.fixture(scope="module")
def tiny():
    net = TinyNet(NET, seed=5)
    net.calibrate(first_conv=True)
    return net


def variants(plan):
    """(unit, plan) pairs: each unit's input scale moved, and each unit reverted to FP32."""
    out = []
    for name, lq in plan.layers.items():
        moved = dict(plan.layers, **{name: replace(lq, scale_in=lq.scale_in * 1.25)})
        out.append((name, replace(plan, layers=moved)))
        out.append((name, replace(plan, layers={k: v for k, v in plan.layers.items()
                                                if k != name})))
    return out


def test_no_cut_splits_a_unit(tiny):
    """c2's unit holds the add and its ReLU: no cut between c2 and r2; a cut resumes from the
    blobs the later nodes read first."""
    cuts = valid_cuts(tiny.fused)
    index = {n.name: n.index for n in tiny.net.nodes}
    assert not [c for c in cuts if index["c2"] < c <= index["r2"]]
    assert index["c3"] in cuts and index["c5"] in cuts
    assert live_blobs(tiny.net.nodes, index["c3"], ["c5"]) == ["s"]
    assert live_blobs(tiny.net.nodes, index["c2"], ["c5"]) == ["c1"]


def test_a_resumed_pass_is_the_whole_pass_bit_for_bit(tiny):
    """For every pair (a first plan stored, a second plan run), at every cut: the second
    plan's outputs through the stored blobs equal its whole pass; it resumed exactly where
    the plans agree before the cut (a change at the cut's own unit or later resumes)."""
    outputs = ["c5"]
    backend = make_backend()
    first = tiny.plan
    cuts = valid_cuts(tiny.fused)
    index = {u.name: u.layer.index for u in tiny.fused.units}
    checked = resumed = 0
    for cut in cuts:
        reuse = PrefixReuse(tiny.fused, len(tiny.batches), outputs, budget=1 << 30)
        reuse.cuts, reuse.live = [cut], {cut: live_blobs(tiny.net.nodes, cut, outputs)}
        run = reuse.runner(first, backend.simulator(tiny.fused, first).overrides)
        for i, feeds in enumerate(tiny.batches):
            run(i, dict(feeds), outputs)
        for unit, plan in variants(first):
            overrides = backend.simulator(tiny.fused, plan).overrides
            before = reuse.resumed
            for i, feeds in enumerate(tiny.batches):
                want = tiny.net(dict(feeds), outputs=outputs, overrides=overrides)["c5"]
                got = reuse.runner(plan, overrides)(i, dict(feeds), outputs)["c5"]
                assert torch.equal(bits(got), bits(want)), (cut, unit)
                checked += 1
            agrees = (prefix_fingerprint(plan, tiny.fused, cut)
                      == prefix_fingerprint(first, tiny.fused, cut))
            assert agrees == (index[unit] >= cut), (cut, unit)
            # a plan that agrees resumes on every batch (then stores its own blobs: the
            # next variant finds them only if it agrees with this one too)
            if agrees:
                assert reuse.resumed - before == len(tiny.batches)
                resumed += 1
            run = reuse.runner(first, backend.simulator(tiny.fused, first).overrides)
            for i, feeds in enumerate(tiny.batches):
                run(i, dict(feeds), outputs)
    assert checked and resumed and resumed < checked


def test_the_cuts_fit_the_budget(tiny):
    """The stored blobs of every cut over every batch stay within the budget; none fits
    none."""
    for budget in (0, 3 * 1024, 1 << 30):
        reuse = PrefixReuse(tiny.fused, 4, ["c5"], budget=budget)
        shapes = tiny.net.blob_shapes
        assert reuse.stored_bytes == sum(
            4 * 4 * int(np.prod(shapes[name])) for c in reuse.cuts for name in reuse.live[c]
            if name in shapes) <= budget
        if budget == 0:
            assert reuse.cuts == []
    assert len(PrefixReuse(tiny.fused, 4, ["c5"], budget=1 << 30).cuts) > 1


def test_a_cut_before_a_blob_written_again_runs_its_first_writer():
    """``c2`` is read by ``c3`` after the cut and then written again by ``c4`` (from
    ``c1``): the pass up to the cut must still run the first writer of ``c2`` (the later one,
    which needs only ``c1``, does not count)."""
    text = (input_text((2, 3, 9, 9))
            + conv_text("c1", "data", "c1", 8, kernel=3, extra="pad: 1")
            + conv_text("c2", "c1", "c2", 8, kernel=1)
            + conv_text("c3", "c2", "c3", 8, kernel=1)
            + conv_text("c4", "c1", "c2", 8, kernel=1)
            + 'layer { name: "sum" type: "Eltwise" bottom: "c2" bottom: "c3" top: "c5" }\n')
    tiny = TinyNet(text, seed=2)
    tiny.calibrate(first_conv=True)
    overrides = make_backend().simulator(tiny.fused, tiny.plan).overrides
    cut = tiny.net.node("c3").index
    reuse = PrefixReuse(tiny.fused, 1, ["c5"], budget=1 << 30)
    reuse.cuts, reuse.live = [cut], {cut: live_blobs(tiny.net.nodes, cut, ["c5"])}
    assert reuse.live[cut] == ["c2", "c1"]
    feeds = tiny.batches[0]
    want = tiny.net(dict(feeds), outputs=["c5"], overrides=overrides)["c5"]
    for _ in range(2):    # storing, then resuming
        got = reuse.runner(tiny.plan, overrides)(0, dict(feeds), ["c5"])["c5"]
        assert torch.equal(bits(got), bits(want))
    assert reuse.resumed == 1
