"""Class imbalance: make an imbalanced split, and correct for it with a weighted loss or a sampler.

When one class is rare, a classifier trained with the plain cross-entropy learns that guessing
the common class is usually right. Two standard corrections, both from PyTorch itself:

* `class_weights` for ``nn.CrossEntropyLoss(weight=...)``: each class's loss counts inversely to
  its frequency, so every class contributes the same total weight;
* `balanced_sampler`, a ``WeightedRandomSampler`` that draws each class equally often.

Plain accuracy hides the problem (predicting "always the common class" scores well), so measure
`d2lft.metrics.per_class_recall` and its mean, `balanced_accuracy`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset, TensorDataset, WeightedRandomSampler

from d2lft.errors import ConfigError

__all__ = [
    "class_counts",
    "class_weights",
    "balanced_sampler",
    "imbalanced_subset",
]


def _targets(data: Any) -> torch.Tensor:
    """Class indices of `data`: a tensor/list of labels, or a dataset that carries them.

    Datasets are read without loading any image: ``.targets`` (ImageFolder, d2lft's cached
    datasets), the last tensor of a ``TensorDataset`` (cached features), or a ``Subset`` of those.
    """
    if isinstance(data, Subset):
        return _targets(data.dataset)[torch.as_tensor(list(data.indices), dtype=torch.long)]
    if isinstance(data, TensorDataset):
        labels = data.tensors[-1]
    elif isinstance(data, Dataset) or hasattr(data, "targets"):
        labels = getattr(data, "targets", None)
        if labels is None:
            raise TypeError(
                f"{type(data).__name__} has no .targets attribute: pass the list of class indices instead, "
                "e.g. class_weights([label for _, label in dataset], num_classes)"
            )
    else:
        labels = data
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ConfigError(
            f"expected class indices (a 1-D integer sequence), got a {labels.dtype} tensor of shape "
            f"{tuple(labels.shape)}; a regression target has no classes to balance"
        )
    if labels.numel() and labels.min() < 0:
        raise ConfigError(f"class indices must be >= 0, found {int(labels.min())}")
    return labels.long()


def _num_classes(labels: torch.Tensor, num_classes: int | None, *, where: str) -> int:
    seen = int(labels.max()) + 1 if labels.numel() else 0
    if num_classes is None:
        if seen == 0:
            raise ConfigError(f"{where}: no targets given, so the number of classes is unknown")
        return seen
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"{where}: num_classes must be an int >= 1, got {num_classes!r}")
    if seen > num_classes:
        raise ConfigError(f"{where}: found class index {seen - 1} but num_classes={num_classes}; is num_classes right?")
    return int(num_classes)


def class_counts(targets: Any, num_classes: int | None = None) -> torch.Tensor:
    """How many samples of each class: an int64 tensor of length `num_classes`.

    `targets` is a sequence of class indices or a dataset carrying them (see `class_weights`).

    >>> class_counts([0, 0, 0, 1], 3)
    tensor([3, 1, 0])
    """
    labels = _targets(targets)
    return torch.bincount(labels, minlength=_num_classes(labels, num_classes, where="class_counts"))


def class_weights(targets: Any, num_classes: int | None = None, *, power: float = 1.0) -> torch.Tensor:
    """Per-class weights for ``nn.CrossEntropyLoss(weight=...)``, inversely proportional to class frequency.

    With ``power=1`` class ``c`` gets ``w_c = N / (K * n_c)`` (``N`` samples, ``K`` classes,
    ``n_c`` of class ``c``): every class then carries the same total weight, and a balanced set
    gets all ones. ``power=0.5`` is a milder correction (``w_c`` proportional to ``n_c ** -0.5``,
    rescaled so the weights average 1 over the samples).

    `targets` may be a sequence/tensor of class indices or a dataset that carries them: an
    ``ImageFolder`` or d2lft dataset (``.targets``), cached features (``TensorDataset``), or a
    ``Subset`` of one (e.g. from `imbalanced_subset`).

    >>> class_weights([0, 0, 0, 1])
    tensor([0.6667, 2.0000])
    >>> loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights([0, 0, 0, 1]))
    """
    if not isinstance(power, numbers.Real) or isinstance(power, bool) or not 0 <= power < math.inf:
        raise ConfigError(f"class_weights: power must be a finite number >= 0 (1: full correction), got {power!r}")
    counts = class_counts(targets, num_classes)
    empty = [i for i, n in enumerate(counts.tolist()) if n == 0]
    if empty:
        raise ConfigError(
            f"class_weights: class {empty} has no samples, so its weight would be infinite; "
            "check the split (every class needs at least one training example) or num_classes"
        )
    raw = counts.double() ** -power
    # Scale so the mean weight over the samples is 1: the loss keeps its usual size.
    weights = raw * counts.sum() / (raw * counts).sum()
    return weights.float()


def balanced_sampler(
    targets: Any,
    num_classes: int | None = None,
    *,
    num_samples: int | None = None,
    replacement: bool = True,
    seed: int | None = 0,
) -> WeightedRandomSampler:
    """A ``WeightedRandomSampler`` that draws every class equally often (in expectation).

    Each sample is drawn with probability proportional to ``1 / n_c`` of its class. Pass it to a
    ``DataLoader(dataset, sampler=..., batch_size=...)`` (without ``shuffle``). One epoch draws
    `num_samples` items (default: the dataset's length) with replacement, so rare images repeat
    and common ones are left out in a given epoch. `seed` fixes the draws (None: global RNG).

    >>> sampler = balanced_sampler([0] * 90 + [1] * 10, num_samples=1000)
    >>> drawn = torch.tensor([0] * 90 + [1] * 10)[list(sampler)]
    >>> 400 < int((drawn == 1).sum()) < 600
    True
    """
    labels = _targets(targets)
    counts = class_counts(labels, num_classes)
    if labels.numel() == 0:
        raise ConfigError("balanced_sampler: no targets given")
    per_sample = 1.0 / counts.double()[labels]
    if num_samples is None:
        num_samples = labels.numel()
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ConfigError(f"balanced_sampler: num_samples must be an int >= 1, got {num_samples!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return WeightedRandomSampler(per_sample, int(num_samples), replacement=replacement, generator=generator)


def imbalanced_subset(
    dataset: Dataset,
    ratios: Sequence[float] | Mapping[int | str, float],
    *,
    seed: int = 0,
) -> Subset:
    """A ``Subset`` keeping the fraction ``ratios[c]`` of each class ``c`` (chosen at random, seeded).

    `ratios` is one fraction per class, or a mapping from class index or class name (looked up in
    ``dataset.classes``) to fraction; classes not in the mapping keep all their samples. Every
    class keeps at least one sample. Kept indices are in the dataset's order.

    >>> ds = TensorDataset(torch.zeros(10, 2), torch.tensor([0] * 5 + [1] * 5))
    >>> sub = imbalanced_subset(ds, [1.0, 0.2])
    >>> class_counts(sub).tolist()
    [5, 1]
    """
    labels = _targets(dataset)
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    classes = list(getattr(dataset, "classes", None) or [])
    num_classes = max(num_classes, len(classes))
    fractions = _fractions(ratios, num_classes, classes)
    generator = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for c, fraction in enumerate(fractions):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        n = min(members.numel(), max(1, round(fraction * members.numel())))
        chosen = members[torch.randperm(members.numel(), generator=generator)[:n]]
        keep += chosen.tolist()
    return Subset(dataset, sorted(keep))


def _fractions(ratios: Any, num_classes: int, classes: list[str]) -> list[float]:
    if isinstance(ratios, Mapping):
        fractions = [1.0] * num_classes
        for key, value in ratios.items():
            if isinstance(key, str):
                if key not in classes:
                    raise ConfigError(f"imbalanced_subset: unknown class {key!r}; the dataset's classes are {classes}")
                index = classes.index(key)
            else:
                index = int(key)
                if not 0 <= index < num_classes:
                    raise ConfigError(f"imbalanced_subset: class index {key!r} out of range [0, {num_classes - 1}]")
            fractions[index] = value
    else:
        fractions = list(ratios)
        if len(fractions) != num_classes:
            raise ConfigError(
                f"imbalanced_subset: {len(fractions)} ratios for {num_classes} classes; give one fraction per "
                "class, or a dict {class: fraction}"
            )
    for f in fractions:
        if not isinstance(f, numbers.Real) or isinstance(f, bool) or not 0 < f <= 1:
            raise ConfigError(f"imbalanced_subset: each ratio must be a fraction in (0, 1], got {f!r}")
    return [float(f) for f in fractions]
