"""Tests for d2lft.imbalance: class weights, the balanced sampler, imbalanced subsets, balanced accuracy."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from d2lft.imbalance import (
    balanced_sampler,
    class_counts,
    class_weights,
    imbalanced_subset,
)


class LabelledDataset(torch.utils.data.Dataset):
    """Like ImageFolder: a .targets list and .classes, and items that must never be loaded here."""

    def __init__(self, targets, classes):
        self.targets = list(targets)
        self.classes = list(classes)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        raise AssertionError("targets must be read without loading images")


def test_class_weights_inverse_frequency_and_mean_one():
    targets = [0] * 6 + [1] * 3 + [2] * 1
    w = class_weights(targets)
    assert torch.allclose(w, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    # every class carries the same total weight; the mean weight over samples is 1
    counts = torch.tensor([6, 3, 1], dtype=torch.float)
    assert torch.allclose(w * counts, torch.full((3,), 10 / 3))
    assert math.isclose(float((w * counts).sum() / counts.sum()), 1.0, rel_tol=1e-6)


def test_class_weights_balanced_is_ones_and_power():
    assert torch.allclose(class_weights([0, 1, 2, 0, 1, 2]), torch.ones(3))
    mild = class_weights([0] * 9 + [1], power=0.5)
    full = class_weights([0] * 9 + [1])
    assert mild[1] / mild[0] == pytest.approx(3.0)  # sqrt(9)
    assert full[1] / full[0] == pytest.approx(9.0)
    assert torch.allclose(class_weights([0] * 9 + [1], power=0), torch.ones(2))


def test_class_weights_reads_datasets_without_loading_images():
    ds = LabelledDataset([0, 0, 0, 1], ["ants", "bees"])
    assert torch.allclose(class_weights(ds), class_weights([0, 0, 0, 1]))
    feats = TensorDataset(torch.zeros(4, 3), torch.tensor([1, 1, 1, 0]))
    assert torch.allclose(class_weights(feats), torch.tensor([2.0, 2 / 3]))
    sub = Subset(ds, [0, 3])
    assert torch.allclose(class_weights(sub), torch.ones(2))


def test_class_weights_errors():
    with pytest.raises(ValueError, match=r"class \[2\] has no samples"):
        class_weights([0, 1, 1], num_classes=3)
    with pytest.raises(ValueError, match="num_classes=2"):
        class_weights([0, 1, 2], num_classes=2)
    with pytest.raises(ValueError, match="regression"):
        class_weights(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="power"):
        class_weights([0, 1], power=-1)


def test_weighted_loss_balances_gradient_of_classes():
    # With the weights, a constant prediction's loss counts both classes equally.
    targets = torch.tensor([0] * 8 + [1] * 2)
    logits = torch.zeros(10, 2, requires_grad=True)
    loss = nn.CrossEntropyLoss(weight=class_weights(targets))(logits, targets)
    loss.backward()
    bias_grad = logits.grad.sum(dim=0)
    assert torch.allclose(bias_grad, torch.zeros(2), atol=1e-6)


def test_balanced_sampler_draws_classes_equally():
    targets = [0] * 95 + [1] * 5
    sampler = balanced_sampler(targets, num_samples=4000, seed=1)
    drawn = torch.tensor(targets)[list(sampler)]
    share = float((drawn == 1).double().mean())
    assert 0.45 < share < 0.55
    assert len(sampler) == 4000
    assert len(balanced_sampler(targets)) == 100  # one epoch = the dataset's length by default


def test_balanced_sampler_seeded_and_in_a_loader():
    ds = TensorDataset(torch.arange(20).float(), torch.tensor([0] * 16 + [1] * 4))
    a = list(balanced_sampler(ds, seed=3))
    b = list(balanced_sampler(ds, seed=3))
    assert a == b
    loader = DataLoader(ds, batch_size=5, sampler=balanced_sampler(ds, seed=0))
    assert sum(len(x) for x, _ in loader) == 20
    with pytest.raises(ValueError, match="num_samples"):
        balanced_sampler(ds, num_samples=0)


def test_imbalanced_subset_keeps_fractions_seeded_sorted():
    ds = LabelledDataset([0] * 50 + [1] * 50, ["ants", "bees"])
    sub = imbalanced_subset(ds, [1.0, 0.1], seed=0)
    assert class_counts(sub).tolist() == [50, 5]
    assert list(sub.indices) == sorted(sub.indices)
    assert list(imbalanced_subset(ds, [1.0, 0.1], seed=0).indices) == list(sub.indices)
    assert list(imbalanced_subset(ds, [1.0, 0.1], seed=1).indices) != list(sub.indices)
    by_name = imbalanced_subset(ds, {"bees": 0.2})
    assert class_counts(by_name).tolist() == [50, 10]
    by_index = imbalanced_subset(ds, {0: 0.5})
    assert class_counts(by_index).tolist() == [25, 50]
    tiny = imbalanced_subset(ds, [0.001, 1.0])  # at least one sample per class survives
    assert class_counts(tiny).tolist() == [1, 50]


def test_imbalanced_subset_errors():
    ds = LabelledDataset([0, 1, 1], ["ants", "bees"])
    with pytest.raises(ValueError, match="one fraction per class"):
        imbalanced_subset(ds, [0.5])
    with pytest.raises(ValueError, match="unknown class 'wasps'"):
        imbalanced_subset(ds, {"wasps": 0.5})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        imbalanced_subset(ds, [0.5, 0.0])
