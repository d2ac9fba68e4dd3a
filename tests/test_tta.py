"""Test-time augmentation (`d2lft.inference.TTA`) and counting what it changes (`metrics.prediction_changes`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.v2 import functional as TF

import d2lft as ft
from d2lft.errors import ConfigError
from d2lft.inference import TTA
from d2lft.metrics import prediction_changes
from nets import staged_net


def _loader(n: int = 24, *, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=8)


def _flip_invariant() -> ft.Net:
    """Convolutions with left-right symmetric kernels and global pooling: a mirror image changes nothing."""
    net = staged_net(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    return net


def test_tta_on_a_flip_invariant_net_equals_the_plain_prediction():
    net, loader = _flip_invariant(), _loader()
    plain, y = ft.predict(net, loader)
    augmented, y2 = ft.predict(TTA(net), loader)
    assert torch.equal(y, y2)
    assert torch.allclose(augmented, plain, atol=1e-5)
    assert not torch.allclose(ft.predict(TTA(staged_net(3)), loader)[0], ft.predict(staged_net(3), loader)[0],
                              atol=1e-4)  # an ordinary net does see the mirror images


def test_tta_averages_the_probabilities_of_every_view_crops_included():
    net, x = staged_net(3).eval(), torch.randn(2, 3, 12, 12)
    h = 6  # crop_fraction 0.5 of 12 pixels
    crops = [x[..., :h, :h], x[..., :h, -h:], x[..., -h:, :h], x[..., -h:, -h:], x[..., 3:9, 3:9]]
    views = [x] + [TF.resize(c, [12, 12], antialias=True) for c in crops]
    views += [v.flip(-1) for v in views]
    with torch.no_grad():
        want = torch.stack([net(v).softmax(1) for v in views]).mean(0)
        tta = TTA(net, crop_fraction=0.5)
        assert len(tta.views(x)) == 12
        assert torch.allclose(tta(x).exp(), want, atol=1e-6)
        assert torch.allclose(tta(x).exp().sum(1), torch.ones(2), atol=1e-6)


def test_evaluate_on_tta_reports_the_accuracy_and_log_loss_of_the_averaged_probabilities():
    net, loader = staged_net(3), _loader()
    probs, y = ft.predict(TTA(net), loader)
    result = ft.evaluate(TTA(net), loader)
    assert result["acc"] == pytest.approx(ft.accuracy(y, probs))
    assert result["loss"] == pytest.approx(nn.functional.nll_loss(probs.log(), y).item(), rel=1e-5)


def test_rotate_adds_the_right_angle_turns_the_8_symmetries_of_the_square():
    net, x = staged_net(3).eval(), torch.randn(2, 3, 12, 12)
    tta = TTA(net, rotate=True)
    views = tta.views(x)
    assert len(views) == 8
    # all 8 views differ: the identity, 3 rotations, and each of the 4 mirrored
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    turned = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    want_views = turned + [v.flip(-1) for v in turned]
    with torch.no_grad():
        want = torch.stack([net(v).softmax(1) for v in want_views]).mean(0)
        assert torch.allclose(tta(x).exp(), want, atol=1e-6)
        # an image and its turned copy get the same averaged prediction
        assert torch.allclose(tta(torch.rot90(x, 1, dims=(-2, -1))).exp(), tta(x).exp(), atol=1e-5)
    assert len(TTA(net, flip=False, rotate=True).views(x)) == 4


def test_tta_refuses_a_crop_fraction_outside_0_1():
    with pytest.raises(ConfigError, match="crop_fraction must be None"):
        TTA(staged_net(), crop_fraction=1.5)


def test_prediction_changes_counts_each_way_on_a_constructed_case():
    targets = [0, 0, 0, 1, 1, 1, 2]
    before = [0, 0, 1, 1, 0, 0, 2]  # right: 0, 1, 3, 6
    after = torch.nn.functional.one_hot(torch.tensor([0, 2, 0, 1, 1, 0, 1]), 3).float()  # right: 0, 2, 3, 4
    changes = prediction_changes(targets, before, after)
    assert changes == {"wrong_to_right": 2, "right_to_wrong": 2, "both_right": 2, "both_wrong": 1}
    with pytest.raises(ConfigError, match="7 targets but 6 predictions"):
        prediction_changes(targets, before[:6], after)


def test_prediction_changes_of_tta_add_up_to_the_change_in_accuracy():
    net, loader = staged_net(3), _loader(48)
    plain, y = ft.predict(net, loader)
    augmented, _ = ft.predict(TTA(net), loader)
    c = prediction_changes(y, plain, augmented)
    assert sum(c.values()) == len(y)
    delta = (c["wrong_to_right"] - c["right_to_wrong"]) / len(y)
    assert ft.accuracy(y, augmented) - ft.accuracy(y, plain) == pytest.approx(delta)
