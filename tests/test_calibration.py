"""Calibration: ECE by its definition, temperature scaling on a constructed overconfident model, the plot."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import d2lft as ft
from d2lft.calibration import expected_calibration_error, fit_temperature, reliability
from d2lft.errors import ConfigError


def _calibrated_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Three groups whose accuracy equals their confidence exactly: 0.55, 0.75, 0.95."""
    probs, targets = [], []
    for confidence, n in ((0.55, 20), (0.75, 40), (0.95, 100)):
        right = round(confidence * n)
        probs += [[confidence, 1 - confidence]] * n
        targets += [0] * right + [1] * (n - right)
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(targets)


def test_ece_of_a_perfectly_calibrated_case_is_zero():
    probs, targets = _calibrated_case()
    assert expected_calibration_error(targets, probs) == pytest.approx(0.0, abs=1e-12)
    r = reliability(targets, probs, bins=10)
    assert sum(r.counts) == 160 and [n for n in r.counts if n] == [20, 40, 100]


def test_ece_matches_the_definition_on_a_hand_computed_case():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.15, 0.85], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 1, 0])
    # bins of 0.1: (0.9, 1] holds 0.95, 0.95 (1 of 2 right); (0.8, 0.9] holds 0.85 (right);
    # (0.6, 0.7] holds 0.7 (right); (0.5, 0.6] holds 0.55 (wrong)
    want = (2 * abs(0.5 - 0.95) + abs(1 - 0.85) + abs(1 - 0.7) + abs(0 - 0.55)) / 5
    assert expected_calibration_error(targets, probs, bins=10) == pytest.approx(want)
    r = reliability(targets, probs, bins=10)
    assert r.accuracy[9] == 0.5 and r.confidence[9] == pytest.approx(0.95) and r.accuracy[0] is None


def _overconfident(n: int = 3000, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels drawn from softmax(z): z is calibrated, 3 * z is the same classifier, overconfident."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, 4, generator=g)
    targets = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z, 3 * z, targets


def test_temperature_scaling_keeps_every_argmax_and_lowers_the_ece_of_an_overconfident_model():
    z, logits, targets = _overconfident()
    t = fit_temperature(logits, targets)
    assert 2.6 < t < 3.4  # the true factor is 3
    before, after = logits.softmax(1), (logits / t).softmax(1)
    assert torch.equal(before.argmax(1), after.argmax(1))
    ece_before = expected_calibration_error(targets, before)
    ece_after = expected_calibration_error(targets, after)
    assert ece_after < ece_before / 3
    assert ece_after == pytest.approx(expected_calibration_error(targets, z.softmax(1)), abs=0.02)
    nll = lambda t: nn.functional.cross_entropy(logits / t, targets).item()  # noqa: E731
    assert nll(t) <= min(nll(t * 0.95), nll(t * 1.05), nll(1.0))  # a minimum of the NLL


def test_fit_temperature_on_logits_from_predict_and_refuses_probabilities():
    z, logits, targets = _overconfident(200)
    net = nn.Identity()
    net.register_parameter("unused", nn.Parameter(torch.zeros(1)))  # predict finds the device from a parameter
    loader = DataLoader(TensorDataset(logits, targets), batch_size=64)
    raw, y = ft.predict(net, loader, logits=True)
    assert torch.allclose(raw, logits) and torch.equal(y, targets)
    with pytest.raises(ConfigError, match="look like probabilities.*logits=True"):
        fit_temperature(ft.predict(net, loader)[0], y)
    with pytest.raises(ConfigError, match="probs must be probabilities"):
        expected_calibration_error(y, logits)
    with pytest.raises(ConfigError, match="bins must be an int"):
        reliability(y, logits.softmax(1), bins=0)


def test_plot_reliability_draws_one_bar_per_filled_bin_and_the_ece():
    import matplotlib.pyplot as plt

    probs, targets = _calibrated_case()
    ax = ft.plot.plot_reliability(reliability(targets, probs, bins=10), label="tiny")
    heights = [round(float(p.get_height()), 3) for p in ax.patches]
    assert heights[:3] == [0.55, 0.75, 0.95] and ax.get_title() == "tiny: ECE 0.0%"
    plt.close(ax.figure)
