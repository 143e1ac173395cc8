"""``calibrator.search.agreement``: top-1 agreement of a configuration with FP32, per sample,
with the FP32 reference kept per batch fingerprint (so recalled FP32 evaluations work)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calibrator.errors import CalibratorError
from calibrator.metrics import make_metric
from calibrator.metrics.agreement import (AgreementMetric, default_scores_blob, fingerprint,
                                          top1)
from calibrator.search.evaluator import Evaluator, SearchState
from tests.quant_helpers import TinyNet, input_text

NET = input_text((4, 3, 6, 6)) + """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param { num_output: 5 } }
"""


@pytest.fixture
def tiny():
    return TinyNet(NET, seed=4)


class _Source:
    """Feeds batches of a TinyNet as a model's data source."""

    def __init__(self, batches):
        self.batches = batches
        self.batch_size = 4

    def prefetch(self, iterations):
        pass

    def batch(self, index):
        return self.batches[index]


class _Model:
    def __init__(self, tiny):
        self.net = tiny.net
        self.source = _Source(tiny.batches)
        self.device = torch.device("cpu")


def _flip_override(tiny, rows):
    """An override of the fc node that swaps the top two scores of the given samples."""
    node = tiny.net.node("fc")

    def run(node_, blobs):
        (out,) = node.module(blobs[node.bottoms[0]])
        out = out.clone()
        for r in rows:
            order = torch.argsort(out[r], descending=True)
            a, b = int(order[0]), int(order[1])
            out[r, a], out[r, b] = out[r, b].clone(), out[r, a].clone()
        return (out,)

    return {node.index: run}


def test_top1_and_fingerprint():
    scores = torch.tensor([[0.1, 0.9, 0.0], [2.0, 2.0, 1.0]])  # a tie takes the first index
    assert top1(scores).tolist() == [[1], [0]]
    spatial = torch.zeros(2, 3, 2, 2)
    spatial[:, 2, 0, 0] = 1
    assert top1(spatial).shape == (2, 4)
    with pytest.raises(CalibratorError, match="class scores"):
        top1(torch.zeros(3))
    a = {"data": torch.ones(2, 2)}
    assert fingerprint(a) == fingerprint({"data": torch.ones(2, 2)})
    assert fingerprint(a) != fingerprint({"data": torch.ones(1, 4)})  # shape counts
    assert fingerprint(a) != fingerprint({"data": torch.ones(2, 2) * 2})


def test_fp32_agrees_with_itself_and_flips_are_counted(tiny):
    metric = make_metric(tiny.net, "fc", "agreement")
    assert metric.outputs() == ["fc", "data"]
    feeds = tiny.batches[0]
    with torch.no_grad():
        fp32 = tiny.net(feeds, outputs=metric.outputs())
        metric.remember(fp32)
        outcome = metric.read(fp32)
        assert outcome.value == 1.0 and outcome.per_sample.tolist() == [True] * 4
        flipped = tiny.net(feeds, outputs=metric.outputs(),
                           overrides=_flip_override(tiny, [1, 3]))
    outcome = metric.read(flipped)
    assert outcome.value == 0.5
    assert outcome.per_sample.tolist() == [True, False, True, False]


def test_reference_is_computed_on_demand_without_an_fp32_pass(tiny):
    """A fresh metric (e.g. after --resume recalled the FP32 evaluation) runs FP32 itself,
    once per batch."""
    metric = AgreementMetric(tiny.net, "fc")
    feeds = tiny.batches[1]
    with torch.no_grad():
        flipped = tiny.net(feeds, outputs=metric.outputs(),
                           overrides=_flip_override(tiny, [0]))
    assert metric.read(flipped).per_sample.tolist() == [False, True, True, True]
    assert len(metric.reference) == 1
    metric.read(flipped)
    assert len(metric.reference) == 1  # recalled, not recomputed


def test_through_the_evaluator_with_a_recalled_fp32_evaluation(tiny, tmp_path):
    model = _Model(tiny)
    state = SearchState(None, {})
    metric = make_metric(tiny.net, None, "agreement")  # the net's only scores output: fc
    assert metric.blob == "fc"
    evaluator = Evaluator(model, metric, 2, state, quiet=True)
    fp32 = evaluator.evaluate(None, None)
    assert fp32.metric == 1.0 and fp32.per_sample.tolist() == [True] * 8

    class Plan:  # stands in for a QuantPlan in the evaluator's fingerprint
        layers = {}

    flipped = evaluator.evaluate(Plan(), _flip_override(tiny, [2]))
    assert flipped.metric == pytest.approx(6 / 8)
    assert flipped.per_sample.tolist() == [True, True, False, True] * 2

    fresh = Evaluator(model, make_metric(tiny.net, None, "agreement"), 2,
                      SearchState(None, {}, dict(state.evaluations)), quiet=True)
    assert fresh.evaluate(None, None).cached
    fresh.state.evaluations.pop(next(k for k in fresh.state.evaluations if k != "fp32"))
    again = fresh.evaluate(Plan(), _flip_override(tiny, [2]))
    assert not again.cached and again.metric == pytest.approx(6 / 8)


def test_combine_weights_batches_by_their_samples(tiny):
    from calibrator.metrics import BatchOutcome

    metric = AgreementMetric(tiny.net, "fc")
    batches = [BatchOutcome(1.0, np.array([True] * 3)), BatchOutcome(0.0, np.array([False]))]
    assert metric.combine(batches) == pytest.approx(0.75)


def test_default_scores_blob_and_errors(tiny):
    accuracy = TinyNet(input_text((4, 3, 6, 6)) + input_text((4,), name="label").replace(
        '"input"', '"label_input"') + """
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 5 } }
layer { name: "top2" type: "Accuracy" bottom: "fc" bottom: "label" top: "top2"
  accuracy_param { top_k: 2 } }
layer { name: "fc_b" type: "InnerProduct" bottom: "data" top: "fc_b"
  inner_product_param { num_output: 5 } }
layer { name: "top1" type: "Accuracy" bottom: "fc_b" bottom: "label" top: "top1" }
""", batches=[])
    assert default_scores_blob(accuracy.net) == "fc_b"  # the Accuracy with the smallest k
    with pytest.raises(CalibratorError, match="no blob 'nope'"):
        AgreementMetric(tiny.net, "nope")
    with pytest.raises(CalibratorError, match="holds no class scores"):
        AgreementMetric(TinyNet(input_text((2, 1))).net, "data")
    two = TinyNet(input_text((2, 3)) + """
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a"
  inner_product_param { num_output: 3 } }
layer { name: "b" type: "InnerProduct" bottom: "data" top: "b"
  inner_product_param { num_output: 3 } }
""", batches=[])
    with pytest.raises(CalibratorError, match="cannot tell which blob"):
        default_scores_blob(two.net)
