"""Calibration: do the predicted probabilities mean what they say?

A classifier is *calibrated* when, among the images it gives 80 % confidence, 80 % are right.
Fine-tuned networks are often overconfident (Guo et al., 2017). This module measures it and
fixes it without changing a single prediction:

* `reliability`: accuracy against confidence in equal-width bins (the data of a reliability
  diagram, drawn by ``d2lft.plot.plot_reliability``) and the expected calibration error;
* `expected_calibration_error`: ``sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|``;
* `fit_temperature`: temperature scaling, one number ``T`` fitted on held-out logits to
  minimise the negative log-likelihood; ``(logits / T).softmax(1)`` keeps every argmax.

The temperature is chosen, so fit it on images the reported figure never saw (a hold-out of
the training images: ``data.holdout(0.2).val``), then measure on ``val/``::

    logits, y = ft.predict(net, holdout_loader, logits=True)
    t = ft.calibration.fit_temperature(logits, y)
    val_logits, val_y = ft.predict(net, data.val, logits=True)
    ft.calibration.expected_calibration_error(val_y, (val_logits / t).softmax(1))
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from d2lft.errors import ConfigError

__all__ = ["Reliability", "reliability", "expected_calibration_error", "fit_temperature"]


@dataclass
class Reliability:
    """Accuracy against confidence per bin (plain lists; empty bins hold None)."""

    edges: list[float]  # bins + 1 bin edges from 0 to 1
    confidence: list[float | None]  # mean confidence of the predictions in each bin
    accuracy: list[float | None]  # fraction of them that are right
    counts: list[int]
    ece: float  # expected calibration error


def _targets(targets: Any, n: int, num_classes: int, *, where: str) -> torch.Tensor:
    t = torch.as_tensor(targets).detach().cpu()
    if t.ndim != 1 or t.is_floating_point() or len(t) != n:
        raise ConfigError(f"{where}: targets must be {n} class indices of shape (N,), got shape {tuple(t.shape)} "
                          f"({t.dtype}); the order is {where}(targets, ...)")
    if n and (t.min() < 0 or t.max() >= num_classes):
        raise ConfigError(f"{where}: targets must be class indices in [0, {num_classes - 1}]")
    return t.long()


def _scores(values: Any, *, where: str, name: str) -> torch.Tensor:
    s = torch.as_tensor(values).detach().cpu().double()
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] < 2:
        raise ConfigError(f"{where}: {name} must have shape (N, num_classes) with N >= 1, got {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ConfigError(f"{where}: {name} holds NaN or infinite values")
    return s


def _check_bins(bins: Any, where: str) -> int:
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
        raise ConfigError(f"{where}: bins must be an int >= 1 (15 is the usual choice), got {bins!r}")
    return int(bins)


def reliability(targets: Any, probs: Any, *, bins: int = 15) -> Reliability:
    """The reliability-diagram data of predicted probabilities: per equal-width confidence bin, the
    mean confidence (the largest probability), the accuracy and the count; and the ECE.

    Bin ``b`` holds the confidences in ``(b / bins, (b + 1) / bins]``.

    >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.65, 0.35], [0.3, 0.7]])
    >>> r = reliability([0, 1, 0, 1], probs, bins=5)
    >>> r.counts, r.accuracy, round(r.ece, 2)      # 0.9 confident but right half the time
    ([0, 0, 0, 2, 2], [None, None, None, 1.0, 0.5], 0.36)
    """
    where = "reliability"
    bins = _check_bins(bins, where)
    p = _scores(probs, where=where, name="probs")
    sums = p.sum(1)
    if p.min() < 0 or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise ConfigError(f"{where}: probs must be probabilities (rows >= 0 summing to 1); for logits pass "
                          "logits.softmax(1)")
    t = _targets(targets, len(p), p.shape[1], where=where)
    confidence, predicted = p.max(1)
    right = (predicted == t).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1])  # edges[b] < confidence <= edges[b + 1]
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    right_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, right)
    ece = float(((conf_sum - right_sum).abs() / len(p)).sum())  # |B|/N * |acc - conf| = |sum(right - conf)| / N
    mean = lambda s: [float(v / c) if c else None for v, c in zip(s, counts)]  # noqa: E731
    return Reliability(edges=edges.tolist(), confidence=mean(conf_sum), accuracy=mean(right_sum),
                       counts=counts.tolist(), ece=ece)


def expected_calibration_error(targets: Any, probs: Any, *, bins: int = 15) -> float:
    """The expected calibration error (equal-width bins): how far confidence is from accuracy, on average.

    0 for a perfectly calibrated model; ``reliability(targets, probs, bins=bins).ece``.

    >>> probs = torch.tensor([[0.75, 0.25]] * 4)            # 75 % confident, 3 of 4 right
    >>> expected_calibration_error([0, 0, 0, 1], probs)
    0.0
    """
    return reliability(targets, probs, bins=bins).ece


def fit_temperature(logits: Any, targets: Any, *, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al., 2017): the ``T > 0`` minimising the NLL of ``softmax(logits / T)``.

    One parameter, fitted with L-BFGS on ``log T`` from ``T = 1``. ``T > 1`` softens an
    overconfident model, ``T < 1`` sharpens an underconfident one; the predicted classes never
    change. Pass logits (``ft.predict(net, loader, logits=True)``) of held-out images, not
    probabilities.

    >>> logits = torch.tensor([[4.0, 0.0]] * 4)              # 98 % confident, right 3 times in 4
    >>> t = fit_temperature(logits, [0, 0, 0, 1])
    >>> round(t, 2), round(float((logits / t).softmax(1)[0, 0]), 2)
    (3.64, 0.75)
    """
    where = "fit_temperature"
    z = _scores(logits, where=where, name="logits")
    sums = z.sum(1)
    if z.min() >= 0 and z.max() <= 1 and torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
        raise ConfigError(f"{where}: these look like probabilities (rows sum to 1); pass logits: "
                          "ft.predict(net, loader, logits=True)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ConfigError(f"{where}: max_iter must be an int >= 1, got {max_iter!r}")
    t = _targets(targets, len(z), z.shape[1], where=where)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=int(max_iter), line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), t)
        loss.backward()
        return loss

    optimizer.step(nll)
    # a model no better than chance drives T to infinity (uniform probabilities): stop at 1000
    return float(log_t.detach().clamp(-math.log(1000), math.log(1000)).exp())
