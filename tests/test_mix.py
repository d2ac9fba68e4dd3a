"""MixUp / CutMix through a collate_fn: fit trains on soft targets and its accuracy bookkeeping stays honest."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import d2lft as ft
from d2lft.errors import ConfigError
from d2lft.freeze import set_train_mode
from d2lft.metrics import batch_score
from d2lft.transforms import mix_collate
from nets import tiny_net


def _dataset(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_mixed_batches_hold_soft_targets_that_are_a_mix_of_two_labels():
    torch.manual_seed(0)
    for collate in (mix_collate(3, cutmix_alpha=0), mix_collate(3, mixup_alpha=0), mix_collate(3)):
        x, y = collate([_dataset()[i] for i in range(8)])
        assert x.shape == (8, 3, 8, 8) and y.shape == (8, 3)
        assert torch.allclose(y.sum(1), torch.ones(8)) and ((y > 0).sum(1) <= 2).all()
    pickle.dumps(mix_collate(3))  # DataLoader workers need a picklable collate_fn


def test_batch_score_of_soft_targets_is_the_label_mass_of_the_predicted_class_and_one_hot_counts_correct():
    outputs = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])  # predicts 0, 2, 1
    labels = torch.tensor([0, 1, 1])
    one_hot = nn.functional.one_hot(labels, 3).float()
    assert batch_score(outputs, one_hot, "classification").item() == batch_score(outputs, labels, "classification")
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3], [0.5, 0.5, 0.0]])
    assert batch_score(outputs, soft, "classification").item() == pytest.approx(0.6 + 0.3 + 0.5)


def test_fit_trains_on_mixed_batches_and_reports_the_train_accuracy_of_the_mixed_targets():
    train = DataLoader(_dataset(), batch_size=8, collate_fn=mix_collate(3))
    val = DataLoader(_dataset(), batch_size=8)
    net = tiny_net(3)
    # lr 0: the net stays as it is, so the reported accuracy can be recomputed batch by batch
    history = ft.fit(net, train, val, epochs=1, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                     progress=False, seed=0, channels_last=False)
    ft.set_seed(0)
    set_train_mode(net, True)
    with torch.no_grad():
        mass = sum(batch_score(net(x), y, "classification").item() for x, y in train)
    assert history.train_acc[0] == pytest.approx(mass / 32, abs=1e-6)
    assert 0 <= history.train_acc[0] <= 1 and history.val_acc[0] == ft.evaluate(net, val)["acc"]

    net = tiny_net(3)
    trained = ft.fit(net, train, val, epochs=2, lr=1e-2, progress=False, seed=0,
                     loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1))  # soft targets and smoothing together
    assert all(0 <= a <= 1 for a in trained.train_acc) and all(torch.isfinite(torch.tensor(trained.train_loss)))


def test_mix_collate_refuses_settings_it_cannot_use():
    with pytest.raises(ConfigError, match="num_classes must be an int >= 2"):
        mix_collate(1)
    with pytest.raises(ConfigError, match="both 0"):
        mix_collate(3, mixup_alpha=0, cutmix_alpha=0)
    with pytest.raises(ConfigError, match="cutmix_alpha must be a number >= 0"):
        mix_collate(3, cutmix_alpha=-1)
