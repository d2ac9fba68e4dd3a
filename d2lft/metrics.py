"""Metrics, one argument order everywhere: ``metric(targets, predictions, ...)`` (as scikit-learn).

`predictions` may be class indices ``(N,)`` or scores/probabilities ``(N, C)`` (the argmax is
taken), so the output of `d2lft.predict` goes in directly. This module is also the one home of
the task vocabulary: what a task's loss is and how a batch is scored.

>>> probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9]])
>>> accuracy([0, 1, 1], probs)
0.6666666666666666
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from d2lft.errors import ConfigError

__all__ = ["TASKS", "accuracy", "confusion_matrix", "per_class_recall", "balanced_accuracy", "prediction_changes"]

TASKS = ("classification", "regression")


def check_task(task: str, *, where: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"{where}: task={task!r} is not one of {list(TASKS)}")
    return task


def loss_for(task: str) -> nn.Module:
    """The default loss of a task: cross-entropy for classes, mean squared error for a value."""
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def metric_name(task: str) -> str:
    """The name the history uses for a task's metric: ``"acc"`` or ``"mae"``."""
    return "acc" if task == "classification" else "mae"


def batch_score(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Correct predictions (classification) or the summed absolute error (regression), on the device.

    Soft targets ``(B, C)`` (MixUp, CutMix: `d2lft.transforms.mix_collate`) score the target
    probability of each predicted class, which for one-hot targets is the number correct.

    >>> outputs = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    >>> batch_score(outputs, torch.tensor([0, 0]), "classification").item()
    1
    >>> round(batch_score(outputs, torch.tensor([[0.7, 0.3], [0.6, 0.4]]), "classification").item(), 4)
    1.1
    """
    if task == "classification":
        predicted = outputs.argmax(1)
        if targets.ndim == 2:
            return targets.float().gather(1, predicted[:, None]).sum()
        return (predicted == targets).sum()
    return (outputs.detach().float() - targets).abs().sum()


def _labels(values: Any, *, name: str, where: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().cpu()
    if t.ndim == 2:  # probabilities or logits: the predicted class
        t = t.argmax(dim=1)
    if t.ndim != 1:
        raise ConfigError(f"{where}: {name} must be class indices (N,) or scores (N, C), got shape {tuple(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ConfigError(f"{where}: {name} holds non-integer values; pass class indices")
    return t.long()


def _pair(targets: Any, predictions: Any, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.as_tensor(targets).ndim != 1:
        raise ConfigError(f"{where}: targets must be class indices of shape (N,), got shape "
                          f"{tuple(torch.as_tensor(targets).shape)}; the order is {where}(targets, predictions)")
    t = _labels(targets, name="targets", where=where)
    p = _labels(predictions, name="predictions", where=where)
    if t.shape != p.shape:
        raise ConfigError(f"{where}: {t.numel()} targets but {p.numel()} predictions")
    if t.numel() == 0:
        raise ConfigError(f"{where}: no targets given")
    return t, p


def accuracy(targets: Any, predictions: Any) -> float:
    """Fraction of correct predictions.

    >>> accuracy([0, 1, 1], [0, 0, 1])
    0.6666666666666666
    """
    t, p = _pair(targets, predictions, where="accuracy")
    return float((p == t).double().mean())


def confusion_matrix(targets: Any, predictions: Any, num_classes: int) -> torch.Tensor:
    """Counts ``C[true, predicted]`` as a ``(num_classes, num_classes)`` int64 tensor.

    >>> confusion_matrix([0, 0, 1, 1], [0, 1, 1, 1], 2)
    tensor([[1, 1],
            [0, 2]])
    """
    where = "confusion_matrix"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"{where}: num_classes must be an int >= 1, got {num_classes!r}")
    t, p = _pair(targets, predictions, where=where)
    for name, values in (("targets", t), ("predictions", p)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ConfigError(
                f"{where}: {name} must be in [0, {num_classes - 1}], got values from "
                f"{int(values.min())} to {int(values.max())}; is num_classes right?"
            )
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes)


def per_class_recall(targets: Any, predictions: Any, num_classes: int) -> torch.Tensor:
    """For each class, the fraction of its samples predicted as that class (NaN for an absent class).

    >>> per_class_recall([0, 0, 1, 1], [0, 0, 0, 1], 2)
    tensor([1.0000, 0.5000])
    """
    counts = confusion_matrix(targets, predictions, num_classes).double()
    return (counts.diagonal() / counts.sum(dim=1)).float()


def balanced_accuracy(targets: Any, predictions: Any, num_classes: int) -> float:
    """Mean of `per_class_recall` over the classes present: 1/K for "always the common class".

    >>> balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0], 2)
    0.5
    """
    recall = per_class_recall(targets, predictions, num_classes)
    return float(recall[~recall.isnan()].mean())


def prediction_changes(targets: Any, before: Any, after: Any) -> dict[str, int]:
    """How many predictions a change (test-time augmentation, another model) turns right or wrong.

    Counts of ``"wrong_to_right"``, ``"right_to_wrong"``, ``"both_right"`` and ``"both_wrong"``;
    the accuracy changes by ``(wrong_to_right - right_to_wrong) / N``, which hides how many
    predictions moved each way (Shanmugam et al., 2021, on test-time augmentation).

    >>> prediction_changes([0, 1, 1, 0], before=[0, 0, 1, 1], after=[1, 1, 1, 1])
    {'wrong_to_right': 1, 'right_to_wrong': 1, 'both_right': 1, 'both_wrong': 1}
    """
    t, b = _pair(targets, before, where="prediction_changes")
    _, a = _pair(targets, after, where="prediction_changes")
    was, now = b == t, a == t
    return {"wrong_to_right": int((~was & now).sum()), "right_to_wrong": int((was & ~now).sum()),
            "both_right": int((was & now).sum()), "both_wrong": int((~was & ~now).sum())}
