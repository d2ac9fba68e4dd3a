"""Tests for d2lft.optim: parameter groups, schedules (against closed-form formulas), lr_find."""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from d2lft.freeze import freeze, train_last, unfreeze
from d2lft.net import Net
from d2lft.optim import SCHEDULERS, lr_find, make_scheduler, param_groups, schedule_curve, suggest_lr
from nets import staged_net


def tiny_net(num_classes: int = 3) -> Net:
    return staged_net(num_classes, conv_bias=True)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def by_name(groups) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


# ----------------------------------------------------------------------------- param_groups


def test_head_gets_lr_mult_and_every_param_once():
    net = tiny_net()
    groups = param_groups(net, lr=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("backbone", 1e-3), ("head", pytest.approx(1e-2))]
    assert all(isinstance(g["lr"], float) and "lr_scale" not in g for g in groups)
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len(ids(all_params)) == len(list(net.parameters()))
    assert ids(by_name(groups)["head"]["params"]) == ids(net.head.parameters())
    torch.optim.AdamW(groups)  # a valid torch optimizer argument, extra "name" key included


def test_layer_decay_gives_each_block_lr_times_decay_power():
    net = tiny_net()
    groups = by_name(param_groups(net, lr=0.1, head_lr_mult=2.0, layer_decay=0.5))
    assert list(groups) == ["backbone.stem", "backbone.stage1", "backbone.stage2", "head"]
    # block i from the top (stage2 = 0) gets lr * d ** (i + 1)
    assert groups["backbone.stage2"]["lr"] == pytest.approx(0.1 * 0.5)
    assert groups["backbone.stage1"]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert groups["backbone.stem"]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert groups["head"]["lr"] == pytest.approx(0.2)
    assert ids(groups["backbone.stage1"]["params"]) == ids(net.backbone.stage1.parameters())


def test_backbone_params_outside_blocks_get_smallest_lr():
    net = tiny_net()
    net.backbone.add_module("extra", nn.Linear(8, 8))  # not listed in net.block_names
    groups = by_name(param_groups(net, lr=0.1, layer_decay=0.5))
    assert groups["backbone.other"]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert ids(groups["backbone.other"]["params"]) == ids(net.backbone.extra.parameters())


def test_no_weight_decay_on_biases_and_norm_weights():
    net = tiny_net()
    groups = param_groups(net, lr=0.1, weight_decay=0.05)
    names = [g["name"] for g in groups]
    assert names == ["backbone", "backbone.no_decay", "head", "head.no_decay"]
    no_decay = ids(p for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    decay = ids(p for g in groups if not g["name"].endswith("no_decay") for p in g["params"])
    bn = net.backbone.stem[1]
    expected_no_decay = {id(bn.weight), id(bn.bias), id(net.head.bias), id(net.backbone.stem[0].bias)}
    assert expected_no_decay <= no_decay
    assert {id(net.head.weight), id(net.backbone.stem[0].weight)} <= decay
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.05)
        assert g["lr"] == pytest.approx(1.0 if g["name"].startswith("head") else 0.1)


def test_trainable_only_excludes_frozen_params():
    net = tiny_net()
    train_last(net, 1)
    everything = [p for g in param_groups(net, lr=0.1) for p in g["params"]]
    assert len(everything) == len(list(net.parameters()))
    groups = param_groups(net, lr=0.1, layer_decay=0.8, trainable_only=True)
    assert [g["name"] for g in groups] == ["backbone.stage2", "head"]
    assert ids(p for g in groups for p in g["params"]) == ids(p for p in net.parameters() if p.requires_grad)
    freeze(net)
    with pytest.raises(ValueError, match="has no trainable parameters"):
        param_groups(net, lr=0.1, trainable_only=True)


def test_unfreezing_later_needs_no_optimizer_change():
    net = tiny_net()
    freeze(net.backbone)
    optimizer = torch.optim.AdamW(param_groups(net, lr=0.01, weight_decay=0.1))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])

    def step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()

    stem_before = net.backbone.stem[0].weight.detach().clone()
    head_before = net.head.weight.detach().clone()
    step()
    assert torch.equal(stem_before, net.backbone.stem[0].weight)  # frozen: untouched, weight decay too
    assert not torch.equal(head_before, net.head.weight)
    unfreeze(net.backbone)
    step()
    assert not torch.equal(stem_before, net.backbone.stem[0].weight)


@pytest.mark.parametrize("bad", [0, -1e-3, float("nan"), float("inf"), "0.1", None, True])
def test_param_groups_validates_lr(bad):
    with pytest.raises(ValueError, match=r"param_groups: lr must be a positive finite number"):
        param_groups(tiny_net(), lr=bad)


def test_param_groups_validates_other_options():
    net = tiny_net()
    with pytest.raises(ValueError, match="layer_decay must be in"):
        param_groups(net, lr=0.1, layer_decay=1.5)
    with pytest.raises(ValueError, match="head_lr_mult"):
        param_groups(net, lr=0.1, head_lr_mult=0)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(net, lr=0.1, weight_decay=-0.1)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        param_groups([nn.Parameter(torch.zeros(2))], lr=0.1)


def test_a_plain_module_gets_one_group_with_the_same_decay_split():
    groups = param_groups(nn.Linear(2, 2), lr=0.1, weight_decay=0.01)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [("params", 0.1, 0.01),
                                                                          ("params.no_decay", 0.1, 0.0)]


# ----------------------------------------------------------------------------- schedulers

E, S, LR = 4, 5, 0.1  # epochs, steps per epoch, base lr
T = E * S


def cosine(s: int, span: int) -> float:
    return LR * (1 + math.cos(math.pi * s / span)) / 2


def test_constant():
    assert schedule_curve("constant", epochs=E, steps_per_epoch=S, lr=LR) == pytest.approx([LR] * T)


def test_step():
    curve = schedule_curve("step", epochs=E, steps_per_epoch=S, lr=LR, step_epochs=2, gamma=0.5)
    assert curve == pytest.approx([LR * 0.5 ** (s // (2 * S)) for s in range(T)])
    default = schedule_curve("step", epochs=6, steps_per_epoch=1, lr=LR)  # step_epochs = epochs // 3
    assert default == pytest.approx([LR, LR, LR / 10, LR / 10, LR / 100, LR / 100])


def test_cosine():
    curve = schedule_curve("cosine", epochs=E, steps_per_epoch=S, lr=LR)
    assert curve == pytest.approx([cosine(s, T) for s in range(T)], abs=1e-12)
    assert curve[0] == LR and curve[-1] < LR * 0.01


def test_warmup_cosine():
    w = S  # warmup_epochs=1
    curve = schedule_curve("warmup_cosine", epochs=E, steps_per_epoch=S, lr=LR)
    expected = [LR * (0.01 + 0.99 * s / w) for s in range(w)] + [cosine(s - w, T - w) for s in range(w, T)]
    assert curve == pytest.approx(expected, abs=1e-12)
    assert curve[0] == pytest.approx(LR * 0.01) and max(curve) == pytest.approx(LR) == curve[w]
    half = schedule_curve("warmup_cosine", epochs=E, steps_per_epoch=S, lr=LR, warmup_epochs=0.4, warmup_start=0.5)
    assert half[:3] == pytest.approx([0.05, 0.075, 0.1])
    no_warmup = schedule_curve("warmup_cosine", epochs=E, steps_per_epoch=S, lr=LR, warmup_epochs=0)
    assert no_warmup == pytest.approx([cosine(s, T) for s in range(T)], abs=1e-12)


def test_onecycle_first_peak_last():
    curve = schedule_curve("onecycle", epochs=E, steps_per_epoch=S, lr=LR, warmup_epochs=1)
    peak_step = round(T * 1 / E) - 1  # OneCycleLR reaches max_lr at pct_start * total - 1
    assert curve[0] == pytest.approx(LR / 25)
    assert curve[peak_step] == pytest.approx(LR) == max(curve)
    assert curve[-1] < LR / 25e3
    assert all(a <= b for a, b in zip(curve[:peak_step], curve[1 : peak_step + 1]))
    assert all(a >= b for a, b in zip(curve[peak_step:], curve[peak_step + 1 :]))


def test_onecycle_keeps_per_group_ratios():
    net = tiny_net()
    optimizer = torch.optim.SGD(param_groups(net, lr=0.01, head_lr_mult=10, layer_decay=0.5), lr=0.01, momentum=0.9)
    wanted = [g["lr"] for g in optimizer.param_groups]
    scheduler = make_scheduler(optimizer, "onecycle", epochs=3, steps_per_epoch=4)
    peaks = [0.0] * len(wanted)
    for _ in range(12):
        lrs = [g["lr"] for g in optimizer.param_groups]
        for got, want in zip(lrs, wanted):
            assert got / lrs[-1] == pytest.approx(want / wanted[-1])
        peaks = [max(p, lr) for p, lr in zip(peaks, lrs)]
        optimizer.step()
        scheduler.step()
    assert peaks == pytest.approx(wanted)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_is_a_torch_scheduler_without_warnings(name):
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = make_scheduler(optimizer, name, epochs=3, steps_per_epoch=2)
        for _ in range(6):
            optimizer.step()
            scheduler.step()
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    assert isinstance(scheduler.state_dict(), dict)


def test_make_scheduler_errors():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*'constant', 'step', 'cosine'"):
        make_scheduler(optimizer, "cosin", epochs=2, steps_per_epoch=2)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        make_scheduler(optimizer, "cosine", epochs=0, steps_per_epoch=2)
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0 and less than epochs=2"):
        make_scheduler(optimizer, "warmup_cosine", epochs=2, steps_per_epoch=2, warmup_epochs=2)
    with pytest.raises(ValueError, match="onecycle needs warmup_epochs > 0"):
        make_scheduler(optimizer, "onecycle", epochs=2, steps_per_epoch=2, warmup_epochs=0)


# ----------------------------------------------------------------------------- lr_find


def learnable_problem(n: int = 256, batch_size: int = 32):
    """Two Gaussian blobs in 10-D: a tiny MLP learns it within a few dozen SGD steps."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 10, generator=g) + 1.5 * (2 * y[:, None] - 1).float()
    torch.manual_seed(0)
    backbone = nn.Sequential(OrderedDict(fc=nn.Linear(10, 16), norm=nn.BatchNorm1d(16), act=nn.ReLU()))
    net = Net(backbone, nn.Linear(16, 2), blocks=["fc", "norm"], num_features=16, name="mlp")
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=g)
    return net, loader


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lr_find_suggests_sensible_lr_and_restores_net(optimizer):
    net, loader = learnable_problem()
    net.eval()
    net.backbone.fc.train()  # a mixed state that must come back exactly
    freeze(net, "backbone.norm")
    modes = {n: m.training for n, m in net.named_modules()}
    before = {k: v.clone() for k, v in net.state_dict().items()}

    result = lr_find(net, loader, optimizer=optimizer, start_lr=1e-5, end_lr=10.0, num_iter=80, progress=False)

    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert not net.backbone.norm.weight.requires_grad and net.backbone.fc.weight.requires_grad
    assert all(p.grad is None for p in net.parameters())

    assert len(result.lrs) == len(result.losses) == len(result.raw_losses) <= 80
    assert result.lrs[0] == pytest.approx(1e-5)
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:])]
    assert ratios == pytest.approx([(10.0 / 1e-5) ** (1 / 79)] * len(ratios))
    assert min(result.losses) < 0.5 * result.losses[0]  # it did learn
    assert 3e-3 <= result.suggestion <= 0.3  # the loss falls fastest around 1e-2 .. 5e-2 here
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]


def test_lr_find_stops_when_loss_diverges():
    net, loader = learnable_problem()
    result = lr_find(net, loader, start_lr=1e-4, end_lr=1e4, num_iter=100, progress=False, diverge=3.0)
    assert result.stopped_early
    assert len(result.lrs) < 100
    assert result.losses[-1] > 3.0 * min(result.losses) or not math.isfinite(result.losses[-1])


def test_lr_find_scales_all_groups_together(monkeypatch):
    net, loader = learnable_problem()
    seen: list[list[float]] = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    result = lr_find(net, loader, optimizer="adamw", head_lr_mult=10.0, layer_decay=0.5,
                     start_lr=1e-4, end_lr=1e-1, num_iter=10, progress=False)
    assert len(seen) == len(result.lrs) == 10
    for lrs, base in zip(seen, result.lrs):  # groups: fc (d**2), norm (d), head (10x)
        assert lrs == pytest.approx([base * 0.25, base * 0.5, base * 10])


def test_lr_find_validates():
    net, loader = learnable_problem()
    with pytest.raises(ValueError, match="end_lr .* must be larger than start_lr"):
        lr_find(net, loader, start_lr=1.0, end_lr=0.1, progress=False)
    with pytest.raises(ValueError, match="lr_find: start_lr must be a positive"):
        lr_find(net, loader, start_lr=0, progress=False)
    with pytest.raises(ValueError, match="optimizer='adam': expected one of"):
        lr_find(net, loader, optimizer="adam", progress=False)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        lr_find(net, [], progress=False)


def test_lr_find_cycles_a_short_loader():
    net, loader = learnable_problem(n=64, batch_size=32)  # 2 batches per pass
    result = lr_find(net, loader, start_lr=1e-4, end_lr=1e-2, num_iter=7, progress=False)
    assert len(result.lrs) == 7 and not result.stopped_early


def test_suggest_lr_falls_back_to_min_over_ten():
    assert suggest_lr([1e-3, 1e-2, 1e-1], [1.0, 0.5, 2.0]) == pytest.approx(1e-3)
    lrs = [10.0**e for e in range(-6, 1)]
    losses = [2.0, 1.95, 1.9, 1.2, 0.9, 0.85, 3.0]  # steepest fall around 1e-3
    assert suggest_lr(lrs, losses) == pytest.approx(1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lr_find_on_another_device_leaves_net_where_it_was():
    net, loader = learnable_problem()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = lr_find(net, loader, device="cuda", num_iter=20, progress=False)
    assert len(result.lrs) == 20
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_lucky_first_batch_does_not_decide_the_suggestion():
    from d2lft.optim import suggest_lr

    lrs = [10.0 ** (-6 + 6 * i / 33) for i in range(34)]
    # the sweep's shape (flat, falling around 1e-3, diverging), but the first batch happened to score lowest
    losses = [0.85] * 14 + [0.85 - 0.04 * k for k in range(1, 12)] + [0.5, 0.9, 1.5, 2.5, 4.0, 6.0, 8.0, 9.0, 9.5]
    losses[0] = 0.3
    suggestion = suggest_lr(lrs, losses)
    assert lrs[14] <= suggestion < lrs[24], suggestion  # on the falling part, not lrs[0] / 10 = 1e-7
