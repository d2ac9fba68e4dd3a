"""Weight averaging: the EMA callback against a hand computation, WiSE-FT's end points, the two soups."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import d2lft as ft
from d2lft.averaging import EMA, greedy_soup, interpolate, uniform_soup
from d2lft.errors import ConfigError
from nets import tiny_net


def _images(n: int = 48, *, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g))


class _Recorder:
    """The net's state before training and after every step (what the EMA averages)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_epoch_start(self, run) -> None:
        if not self.states:
            self.states.append(copy.deepcopy(run.net.state_dict()))

    def on_batch_end(self, run) -> None:
        self.states.append(copy.deepcopy(run.net.state_dict()))


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_equals_the_hand_computed_average_of_every_step_batchnorm_statistics_included(warmup):
    net = tiny_net()
    recorder, ema = _Recorder(), EMA(decay=0.5, warmup=warmup)
    loader = DataLoader(_images(48), batch_size=4)  # 12 steps: the warm-up (t < 8) and the plain decay
    ft.fit(net, loader, epochs=1, lr=0.05, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
           callbacks=[recorder, ema], progress=False, best=None)
    expected = {k: v.clone() for k, v in recorder.states[0].items()}
    for t, state in enumerate(recorder.states[1:], start=1):
        d = min(0.5, (1 + t) / (10 + t)) if warmup else 0.5
        for k, v in state.items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    assert ema.updates_ == 12 and set(got) == set(expected)
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
    bn = "backbone.stem.1"
    assert not torch.allclose(got[f"{bn}.running_mean"], net.state_dict()[f"{bn}.running_mean"])  # averaged, not copied
    assert got[f"{bn}.num_batches_tracked"] == 12  # a count: the model's
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.module.backbone.stem[0].weight.is_contiguous()  # fit hands back contiguous weights


def test_ema_warmup_decay_follows_the_formula_and_a_high_decay_would_lag():
    ema = EMA(0.999)
    assert [ema.decay_at(t) for t in (1, 2, 90)] == [2 / 11, 3 / 12, 0.91]
    assert ema.decay_at(100_000) == 0.999 and EMA(0.999, warmup=False).decay_at(1) == 0.999


def test_ema_copy_to_and_checkpoint_state_round_trip():
    net = tiny_net()
    ema = EMA(0.9)
    ft.fit(net, DataLoader(_images(16), batch_size=4), epochs=1, callbacks=[ema], progress=False, best=None)
    other = tiny_net(seed=1)
    ema.copy_to(other)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(other.eval()(x), ema.module.eval()(x))

    restored = EMA(0.5)
    restored.load_state_dict(ema.state_dict())
    restored.start(tiny_net(seed=2))  # a resumed run: the saved average, not the new net's weights
    assert restored.updates_ == 4 and restored.decay == 0.9
    for k, v in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[k], v), k


def test_ema_refuses_a_decay_outside_0_1_and_says_so_before_training():
    with pytest.raises(ConfigError, match="decay must be a number in"):
        EMA(decay=1.0)
    with pytest.raises(ConfigError, match="pass it to fit"):
        EMA().module  # noqa: B018


def _bn_trained(seed: int) -> nn.Module:
    net = tiny_net(seed=seed)
    for _ in range(1 + seed):  # running statistics and num_batches_tracked differ per net
        net.train()(torch.randn(4, 3, 8, 8))
    return net


def test_interpolate_gives_the_end_points_exactly_and_the_mean_halfway():
    start, end = _bn_trained(0), _bn_trained(1)
    before = copy.deepcopy(start.state_dict())
    for alpha, want in ((0.0, start.state_dict()), (1.0, end.state_dict())):
        got = interpolate(start, end, alpha).state_dict()
        for k, v in got.items():
            if v.is_floating_point():
                assert torch.equal(v, want[k]), (alpha, k)
    half = interpolate(start.state_dict(), end.state_dict(), 0.5)  # state dicts in, a state dict out
    assert isinstance(half, dict)
    for k, v in half.items():
        if v.is_floating_point():
            assert torch.allclose(v, (start.state_dict()[k] + end.state_dict()[k]) / 2, atol=1e-7), k
        else:
            assert torch.equal(v, end.state_dict()[k]), k  # integer buffers from end
    assert half["head.1.weight"].shape == (2, 8)  # the head is interpolated too
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in before.items())  # inputs untouched


def test_interpolate_refuses_nets_with_other_heads_naming_the_weight():
    with pytest.raises(ConfigError, match=r"'head.1.weight' has shape \(2, 8\) in start but \(3, 8\) in end"):
        interpolate(tiny_net(2), tiny_net(3), 0.5)
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        interpolate(tiny_net(), tiny_net(), float("nan"))


def test_uniform_soup_is_the_mean_of_the_weights():
    nets = [_bn_trained(s) for s in (0, 1, 2)]
    soup = uniform_soup(nets)
    assert isinstance(soup, nn.Module) and soup is not nets[0]
    for k, v in soup.state_dict().items():
        stacked = torch.stack([n.state_dict()[k] for n in nets])
        if v.is_floating_point():
            assert torch.allclose(v, stacked.mean(0), atol=1e-6), k
        else:
            assert torch.equal(v, nets[0].state_dict()[k]), k


def test_greedy_soup_never_scores_below_its_best_ingredient_and_leaves_out_a_harmful_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = (x @ torch.tensor([1.0, -1.0, 0.5, 0.0]) > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    truth = torch.tensor([[-1.0, 1.0, -0.5, 0.0], [1.0, -1.0, 0.5, 0.0]]) / 2
    ingredients = []
    for noise in (0.6, 0.5, 0.7, 0.4):  # noisy fine-tunes around the same solution: averaging cancels noise
        net = nn.Linear(4, 2)
        net.weight.data = truth + noise * torch.randn(2, 4, generator=g)
        net.bias.data = torch.zeros(2)
        ingredients.append(net)
    harmful = nn.Linear(4, 2)
    harmful.weight.data, harmful.bias.data = -3 * truth, torch.zeros(2)
    ingredients.insert(2, harmful)

    soup = greedy_soup(ingredients, loader)
    scores = [ft.evaluate(n, loader)["acc"] for n in ingredients]
    assert soup.scores == scores
    assert soup.score >= max(scores) and soup.score == ft.evaluate(soup.net, loader)["acc"]
    assert soup.ingredients[0] == scores.index(max(scores)) and 2 not in soup.ingredients
    assert len(soup.ingredients) > 1
    kept = uniform_soup([ingredients[i] for i in soup.ingredients])
    assert torch.allclose(kept.weight, soup.net.weight)


def test_ema_resumes_from_a_checkpoint_as_if_the_run_had_not_stopped(tmp_path):
    loader = DataLoader(_images(16), batch_size=4)
    whole = EMA(0.9)
    ft.fit(tiny_net(), loader, epochs=2, callbacks=[whole], progress=False, best=None, seed=0)
    first = EMA(0.9)
    ft.fit(tiny_net(), loader, epochs=1, callbacks=[first], progress=False, best=None, seed=0,
           checkpoint=tmp_path / "run.pt")
    resumed = EMA(0.9)
    ft.fit(tiny_net(seed=3), loader, epochs=2, callbacks=[resumed], progress=False, best=None, seed=0,
           resume=tmp_path / "run.pt")
    assert resumed.updates_ == whole.updates_ == 8
    for k, v in whole.module.state_dict().items():
        assert torch.allclose(resumed.module.state_dict()[k], v, atol=1e-6), k
