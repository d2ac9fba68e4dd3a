"""Tests for d2lft.ensemble: averaging class probabilities of several members."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from d2lft.ensemble import average_predictions
from d2lft.metrics import accuracy


def test_average_of_tensors_and_weights():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(average_predictions([a, b]), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert torch.allclose(average_predictions([a, b], weights=[3, 1]), torch.tensor([[0.75, 0.25], [0.0, 1.0]]))
    assert torch.equal(average_predictions([a]), a)


def test_ensemble_fixes_a_members_mistakes():
    # Three members, each wrong (confidently or not) on a different sample: the soft vote gets all right.
    targets = torch.tensor([0, 1, 0])
    m1 = torch.tensor([[0.4, 0.6], [0.1, 0.9], [0.9, 0.1]])
    m2 = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
    m3 = torch.tensor([[0.8, 0.2], [0.2, 0.8], [0.45, 0.55]])
    for m in (m1, m2, m3):
        assert accuracy(targets, m) == pytest.approx(2 / 3)
    assert accuracy(targets, average_predictions([m1, m2, m3])) == 1.0


def test_rejects_logits_mismatched_shapes_and_bad_weights():
    probs = torch.tensor([[0.5, 0.5]])
    with pytest.raises(ValueError, match="softmax"):
        average_predictions([probs, torch.tensor([[2.0, -1.0]])])
    with pytest.raises(ValueError, match="disagree on shape"):
        average_predictions([probs, torch.tensor([[0.5, 0.5], [0.5, 0.5]])])
    with pytest.raises(ValueError, match="weights"):
        average_predictions([probs, probs], weights=[1.0])
    with pytest.raises(ValueError, match="no members"):
        average_predictions([])
    with pytest.raises(TypeError, match="expected an nn.Module"):
        average_predictions([[0.5, 0.5]])


def _linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def test_models_are_run_on_the_loader():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    loader = DataLoader(TensorDataset(x, torch.tensor([0, 1, 0])), batch_size=2)
    nets = [_linear([[1.0, 0.0], [0.0, 1.0]]), _linear([[0.0, 1.0], [1.0, 0.0]])]
    expected = (nets[0](x).softmax(1) + nets[1](x).softmax(1)).detach() / 2
    assert torch.allclose(average_predictions(nets, loader), expected, atol=1e-6)
    # a model and precomputed probabilities mix; one loader per member works too
    mixed = average_predictions([nets[0], nets[1](x).softmax(1).detach()], [loader, None])
    assert torch.allclose(mixed, expected, atol=1e-6)
    with pytest.raises(ValueError, match="pass a loader"):
        average_predictions(nets)
    with pytest.raises(ValueError, match="2 loaders for 1 members"):
        average_predictions(nets[:1], [loader, loader])
