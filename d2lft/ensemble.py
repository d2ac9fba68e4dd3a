"""Model fusion: average the class probabilities of several models.

Models fine-tuned with different seeds, strategies or architectures make partly different
mistakes; averaging their predicted probabilities (a "soft vote") cancels some of them, its
log-loss is never worse than the members' average (the log-loss is convex), and its accuracy is
often about as good as the best member's, at the price of running every member.
"""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from d2lft.errors import ConfigError

__all__ = ["average_predictions"]


def _check_probs(probs: torch.Tensor, index: int) -> torch.Tensor:
    if probs.ndim != 2:
        raise ConfigError(f"average_predictions: member {index} has shape {tuple(probs.shape)}; "
                         "expected probabilities of shape (N, num_classes)")
    probs = probs.detach().float().cpu()
    sums = probs.sum(dim=1)
    if probs.numel() and (probs.min() < 0 or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
        raise ConfigError(
            f"average_predictions: member {index} is not probabilities (rows must be >= 0 and sum to 1); "
            "if these are logits, pass logits.softmax(dim=1), or pass the model itself with a loader"
        )
    return probs


def average_predictions(
    members: Sequence[nn.Module | torch.Tensor],
    loader: Iterable | Sequence[Iterable] | None = None,
    *,
    weights: Sequence[float] | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The (weighted) mean of the members' class probabilities, shape ``(N, num_classes)``.

    Each member is either a probability tensor ``(N, C)`` (e.g. the first result of
    `d2lft.predict`) or a model, which is run on `loader` with `d2lft.predict` (eval mode, no
    gradients). `loader` may be one loader for all models or a list, one per member (e.g. a
    probe's head on cached features next to a full model on images); the loaders must yield the
    same samples in the same order (no shuffling). `weights` default to equal.

    >>> a = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    >>> b = torch.tensor([[0.7, 0.3], [0.8, 0.2]])
    >>> average_predictions([a, b])
    tensor([[0.8000, 0.2000],
            [0.6000, 0.4000]])
    """
    members = list(members)
    if not members:
        raise ConfigError("average_predictions: no members given; pass a list of models or probability tensors")
    loaders = _loaders(loader, members)
    probs = []
    for i, member in enumerate(members):
        if isinstance(member, nn.Module):
            if loaders[i] is None:
                raise ConfigError(f"average_predictions: member {i} is a model ({type(member).__name__}); "
                                 "pass a loader to run it on")
            from d2lft.train import predict

            member, _ = predict(member, loaders[i], device=device)
        elif not isinstance(member, torch.Tensor):
            raise TypeError(f"average_predictions: member {i} is a {type(member).__name__}; "
                            "expected an nn.Module or a probability tensor (N, num_classes)")
        probs.append(_check_probs(member, i))
    shapes = {tuple(p.shape) for p in probs}
    if len(shapes) > 1:
        raise ConfigError(f"average_predictions: members disagree on shape {sorted(shapes)}: they must score the "
                         "same samples (same loader order, no shuffle) with the same classes")
    if weights is None:
        weights = [1.0] * len(probs)
    weights = list(weights)
    if len(weights) != len(probs) or any(
        not isinstance(w, numbers.Real) or isinstance(w, bool) or w < 0 for w in weights
    ) or sum(weights) <= 0:
        raise ConfigError(f"average_predictions: weights must be {len(probs)} numbers >= 0 with a positive sum, "
                         f"got {weights!r}")
    total = sum(weights)
    return sum(w / total * p for w, p in zip(weights, probs))


def _loaders(loader: Any, members: list) -> list:
    if loader is None or not isinstance(loader, (list, tuple)):
        return [loader] * len(members)
    if len(loader) != len(members):
        raise ConfigError(f"average_predictions: {len(loader)} loaders for {len(members)} members; "
                         "pass one loader, or one per member")
    return list(loader)
