"""Accuracy: BVLC's tie rule, top_k, ignore_label, per-class top and per_sample, by hand."""

import numpy as np
import pytest
import torch

from calibrator.errors import LayerError
from tests.layer_helpers import make_layer, run


def accuracy(param: str, scores_shape, label_shape, tops: int = 1):
    top_text = " ".join(f'top: "t{i}"' for i in range(tops))
    return make_layer(f'name: "acc" type: "Accuracy" bottom: "s" bottom: "l" {top_text} '
                      f'accuracy_param {{ {param} }}', [scores_shape, label_shape])


SCORES = np.array([
    [0.1, 0.7, 0.2, 0.0],  # label 1: the unique best
    [0.5, 0.5, 0.0, 0.0],  # label 0: tied with class 1
    [0.3, 0.2, 0.4, 0.1],  # label 0: second best
    [0.2, 0.2, 0.2, 0.4],  # label 2: tied with two others below class 3
    [0.9, 0.0, 0.0, 0.1],  # label 3: ignored in some tests
], np.float32)
LABELS = np.array([1, 0, 0, 2, 3], np.float32)


def test_ties_count_against_the_label():
    # BVLC: correct iff fewer than top_k *other* classes score >= the label's score.
    (top1,) = run(accuracy("", SCORES.shape, LABELS.shape), SCORES, LABELS)
    assert top1 == pytest.approx(1 / 5)  # only sample 0; sample 1's tie fails at top 1
    (top2,) = run(accuracy("top_k: 2", SCORES.shape, LABELS.shape), SCORES, LABELS)
    # samples 0, 1, 2 and 4 (one other above); sample 3 has 3 others >= its 0.2
    assert top2 == pytest.approx(4 / 5)
    (top4,) = run(accuracy("top_k: 4", SCORES.shape, LABELS.shape), SCORES, LABELS)
    assert top4 == pytest.approx(1.0)


def test_ignore_label_and_per_class_top():
    layer = accuracy("top_k: 2 ignore_label: 3", SCORES.shape, LABELS.shape, tops=2)
    top, per_class = run(layer, SCORES, LABELS)
    assert top == pytest.approx(3 / 4)  # sample 4 does not count
    # class 0: samples 1, 2 both right; class 1: sample 0 right; class 2: sample 3 wrong;
    # class 3: only ignored samples, so 0.
    np.testing.assert_allclose(per_class, [1, 1, 0, 0])


def test_per_sample_leaves_ignored_samples_out():
    layer = accuracy("top_k: 2 ignore_label: 0", SCORES.shape, LABELS.shape)
    correct = layer.per_sample(torch.from_numpy(SCORES), torch.from_numpy(LABELS))
    assert correct.dtype == torch.bool
    assert correct.tolist() == [True, False, True]  # samples 0, 3, 4


def test_all_ignored_gives_zero():
    layer = accuracy("ignore_label: 1", (2, 3), (2,))
    (top,) = run(layer, np.ones((2, 3)), np.array([1, 1]))
    assert top == 0


def test_spatial_labels_along_axis_1():
    scores = np.zeros((1, 3, 2, 2), np.float32)
    scores[0, 2] = 1  # class 2 wins everywhere ...
    scores[0, 0, 1, 1] = 2  # ... except at (1, 1)
    labels = np.array([[[2, 2], [0, 0]]], np.float32)  # right at 3 of 4 positions
    (top,) = run(accuracy("", scores.shape, labels.shape), scores, labels)
    assert top == pytest.approx(3 / 4)
    scores_last = np.ascontiguousarray(scores.transpose(0, 2, 3, 1))  # classes on axis 3
    (top,) = run(accuracy("axis: -1", scores_last.shape, labels.shape), scores_last, labels)
    assert top == pytest.approx(3 / 4)


def test_accuracy_rejects_mismatched_labels():
    with pytest.raises(LayerError):
        accuracy("", (4, 3), (3,))
    with pytest.raises(LayerError):
        accuracy("top_k: 4", (4, 3), (4,))
    layer = accuracy("", (2, 3), (2,))
    with pytest.raises(LayerError):
        run(layer, np.ones((2, 3)), np.array([0, 3]))
