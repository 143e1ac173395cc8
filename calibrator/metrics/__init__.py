"""Metrics: what a pass over TEST batches measures, one definition used by ``calibrator
test``, the search and the gate.

Kinds (``--metric``; ``blob`` picks by the layer that produces the ``-n`` blob):

``accuracy`` (:mod:`~calibrator.metrics.accuracy`)
    An Accuracy top, with per-image correctness.
``map`` (:mod:`~calibrator.metrics.detection`)
    A DetectionEvaluate top: mAP over all batches by ``ap_version``.
``mean`` (:mod:`~calibrator.metrics.mean`)
    Any blob averaged over the batches, as ``caffe test`` prints it.
``agreement`` (:mod:`~calibrator.metrics.agreement`)
    Label-free top-1 agreement with FP32 on a scores blob.

Adding a metric is one module with a :class:`~calibrator.metrics.base.Metric` subclass whose
constructor takes ``(net, blob)``, registered with ``register_metric("name")``.
:func:`measure` runs several metrics over the same batches in one pass.
"""

from __future__ import annotations

from typing import Callable

import torch

from calibrator import distributed
from calibrator.data.feed import batches
from calibrator.errors import CalibratorError
from calibrator.graph.layers.detection_evaluate import seek_state
from calibrator.metrics.accuracy import AccuracyMetric, primary_accuracy_layer
from calibrator.metrics.agreement import AgreementMetric, default_scores_blob
from calibrator.metrics.base import BatchOutcome, Metric
from calibrator.metrics.detection import AP_VERSIONS, DetectionMAP
from calibrator.metrics.mean import BlobMean

AUTO = "blob"
_METRICS: dict[str, type[Metric]] = {}


def register_metric(kind: str) -> Callable[[type[Metric]], type[Metric]]:
    """Class decorator: ``--metric kind`` builds this Metric as ``cls(net, blob)``."""

    def decorate(cls: type[Metric]) -> type[Metric]:
        if kind == AUTO or kind in _METRICS:
            raise ValueError(f"metric kind '{kind}' registered twice")
        cls.kind = kind
        _METRICS[kind] = cls
        return cls

    return decorate


register_metric("accuracy")(AccuracyMetric)
register_metric("map")(DetectionMAP)
register_metric("mean")(BlobMean)
register_metric("agreement")(AgreementMetric)


def metric_kinds() -> tuple[str, ...]:
    """``blob`` and every registered kind, for command-line choices."""
    return (AUTO,) + tuple(_METRICS)


def describe_metrics() -> str:
    return "; ".join([f"{AUTO}: by the layer producing the -n blob (Accuracy -> accuracy, "
                      "DetectionEvaluate -> map, else mean)"]
                     + [f"{kind}: {cls.description}" for kind, cls in _METRICS.items()])


def kind_of(net, blob: str) -> str:
    """The kind ``blob`` picks for this blob: by the layer that produces it."""
    producers = net.writers(blob)
    if producers and producers[-1].type == "Accuracy" and producers[-1].tops[0] == blob:
        return "accuracy"
    if producers and producers[-1].type == "DetectionEvaluate":
        return "map"
    return "mean"


def make_metric(net, blob: str | None, kind: str = AUTO, *,
                ap_version: str | None = None) -> Metric:
    """The metric ``kind`` on ``blob`` of ``net`` (``ap_version`` for mAP)."""
    if kind != AUTO and kind not in _METRICS:
        raise CalibratorError(f"--metric {kind}: unknown metric (choose from "
                              f"{', '.join(metric_kinds())})")
    if kind == "agreement":
        return AgreementMetric(net, blob or None)
    if not blob:
        raise CalibratorError(f"--metric {kind} needs the metric blob (-n BLOB)")
    if blob not in net.blob_shapes and blob not in net.output_names:
        raise CalibratorError(f"-n {blob}: no such blob in the TEST net")
    if kind == AUTO:
        kind = kind_of(net, blob)
    if kind == "map":
        return DetectionMAP(net, blob, ap_version)
    return _METRICS[kind](net, blob)


def default_metric_blob(test_param, detection: bool) -> str:
    """Intel's rule: the top of the Accuracy layer with the smallest top_k (the
    DetectionEvaluate top for detection)."""
    if detection:
        for layer in test_param.layer:
            if layer.type == "DetectionEvaluate":
                return layer.top[0]
        raise CalibratorError("-d 1: the TEST net has no DetectionEvaluate layer")
    layer = primary_accuracy_layer(test_param.layer)
    if layer is None:
        raise CalibratorError("the TEST net has no Accuracy layer: name the metric blob with -n")
    return layer.top[0]


def loss(fp32: float, value: float, relative: bool = False,
         lower_is_better: bool = False) -> float:
    """What ``-l`` bounds: the drop from FP32 (a rise when lower is better), relative to
    |FP32| when asked."""
    drop = (value - fp32) if lower_is_better else (fp32 - value)
    return drop / abs(fp32) if relative and fp32 else drop


def measure(model, metrics: list[Metric], iterations: int, *, net=None, overrides=None,
            reference: bool = False, desc: str = "evaluate", quiet: bool = False,
            stop: Callable[[list[list[BatchOutcome]]], bool] | None = None,
            on_batch: Callable[[int, dict], None] | None = None, first: int = 0,
            start: bool = True, runner: Callable[[int, dict, list], dict] | None = None
            ) -> list[list[BatchOutcome]]:
    """Every metric over the first ``iterations`` TEST batches of ``model``'s source, in one
    pass of ``net`` (default ``model.net``) under ``overrides``; per metric, the outcome of
    each batch read. ``reference``: this is the FP32 pass (metrics relative to FP32 keep
    it). ``on_batch(index, outputs)`` sees each batch's outputs; ``stop(outcomes)``, asked
    after each batch, ends the pass early. ``first``: skip the batches before it (an
    earlier pass read them; ``start=False`` then keeps the metrics' state). ``runner(index,
    feeds, outputs)``, where given, computes a batch's outputs instead of the pass of ``net``
    (the same values: :mod:`calibrator.search.reuse` resumes it from stored blobs).

    Under torchrun the batches are sharded across the ranks and the outcomes gathered back
    in batch order, so every rank returns what one process would (``on_batch`` runs on the
    rank that read the batch). With ``stop`` the ranks read a batch each per round (batch
    ``first + round * N + rank``), gather the round and ask ``stop`` after each of its
    batches in order: the pass ends at the batch one process ends at (the rest of that
    round is dropped)."""
    net = model.net if net is None else net
    wanted = sorted({blob for metric in metrics for blob in metric.outputs()})
    if start:
        for metric in metrics:
            metric.start(net)
    sharded = distributed.world() > 1

    def read(index: int, feeds) -> list[BatchOutcome]:
        if sharded:  # DetectionEvaluate's image counter: this batch's first image
            seek_state(net, index * model.batch_size)
        outputs = (net(feeds, outputs=wanted, overrides=overrides) if runner is None
                   else runner(index, feeds, wanted))
        if on_batch is not None:
            on_batch(index, outputs)
        row = []
        for metric in metrics:
            if reference:
                metric.remember(outputs)
            row.append(metric.read(outputs))
        return row

    outcomes: list[list[BatchOutcome]] = [[] for _ in metrics]
    with torch.no_grad():
        if not sharded or stop is None:
            def run() -> dict[int, list[BatchOutcome]]:
                done: dict[int, list[BatchOutcome]] = {}
                for index, feeds in batches(model, iterations, desc=desc, quiet=quiet,
                                            first=first, shard=sharded):
                    done[index] = read(index, feeds)
                    for seen, outcome in zip(outcomes, done[index]):
                        seen.append(outcome)
                    if stop is not None and stop(outcomes):
                        break
                return done

            rows = distributed.gather_batches(run, sharded=sharded)
            return [[row[position] for row in rows] for position in range(len(metrics))]
        mine = batches(model, iterations, desc=desc, quiet=quiet, first=first, shard=True)
        try:
            for round_start in range(first, iterations, distributed.world()):
                def run_round() -> dict[int, list[BatchOutcome]]:
                    if round_start + distributed.rank() >= iterations:
                        return {}  # the last round has fewer batches than ranks
                    index, feeds = next(mine)
                    return {index: read(index, feeds)}

                for row in distributed.gather_batches(run_round):
                    for seen, outcome in zip(outcomes, row):
                        seen.append(outcome)
                    if stop(outcomes):
                        return outcomes
        finally:
            mine.close()
    return outcomes


__all__ = ["AUTO", "AP_VERSIONS", "AccuracyMetric", "AgreementMetric", "BatchOutcome",
           "BlobMean", "DetectionMAP", "Metric", "default_metric_blob", "default_scores_blob",
           "describe_metrics", "kind_of", "loss", "make_metric", "measure", "metric_kinds",
           "primary_accuracy_layer", "register_metric"]
