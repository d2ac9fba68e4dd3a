"""Metrics: one argument order, (targets, predictions), scores or class indices as predictions."""
from __future__ import annotations

import pytest
import torch

from d2lft.metrics import accuracy, balanced_accuracy, confusion_matrix, per_class_recall


def test_confusion_matrix_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 4, (200,), generator=g)
    p = torch.randint(0, 4, (200,), generator=g)
    expected = torch.zeros(4, 4, dtype=torch.long)
    for i, j in zip(t.tolist(), p.tolist()):
        expected[i, j] += 1
    assert torch.equal(confusion_matrix(t, p, 4), expected)
    scores = torch.nn.functional.one_hot(p, 4).float() + 0.01  # (N, C) scores: argmax is p
    assert torch.equal(confusion_matrix(t.tolist(), scores, 4), expected)


def test_confusion_matrix_errors():
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="2 targets but 3 predictions"):
        confusion_matrix([0, 1], [0, 1, 1], 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([0], [0], 0)


def test_per_class_recall_and_balanced_accuracy():
    targets = [0, 0, 0, 0, 1, 1]
    always_zero = [0] * 6
    assert per_class_recall(targets, always_zero, 2).tolist() == [1.0, 0.0]
    assert balanced_accuracy(targets, always_zero, 2) == 0.5
    scores = torch.tensor([[0.9, 0.1]] * 3 + [[0.2, 0.8]] * 3)  # one ant wrong, both bees right
    assert per_class_recall(targets, scores, 2).tolist() == pytest.approx([0.75, 1.0])
    assert balanced_accuracy(targets, scores, 2) == pytest.approx(0.875)
    # a class absent from the targets is left out of the mean
    assert balanced_accuracy([0, 0], [0, 1], 3) == 0.5


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert accuracy(torch.tensor([1, 1]), torch.tensor([[0.2, 0.8], [0.9, 0.1]])) == 0.5
    with pytest.raises(ValueError, match="2 targets but 3 predictions"):
        accuracy([0, 1], [0, 1, 1])


def test_every_metric_takes_targets_first_and_says_so():
    probs = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    for metric in (accuracy, lambda t, p: per_class_recall(t, p, 2), lambda t, p: confusion_matrix(t, p, 2)):
        with pytest.raises(ValueError, match=r"targets must be class indices of shape \(N,\).*\(targets, predictions\)"):
            metric(probs, torch.tensor([1, 1]))  # the old order of ensemble.accuracy
