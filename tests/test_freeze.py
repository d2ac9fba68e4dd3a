"""Tests for d2lft.freeze on tiny real conv nets (fast, CPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from d2lft.freeze import (
    GradualUnfreezing,
    count_parameters,
    freeze,
    set_train_mode,
    train_blocks,
    train_last,
    trainable_blocks,
    unfreeze,
)
from d2lft.optim import param_groups
from nets import staged_net as tiny_net

BLOCKS = ["backbone.stem", "backbone.stage1", "backbone.stage2"]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_freeze_and_unfreeze_whole_module_and_by_name():
    net = tiny_net()
    total = n_params(net)
    assert count_parameters(net) == (total, total)
    freeze(net)
    assert count_parameters(net) == (total, 0)
    unfreeze(net, ["head", "backbone.stage2"])
    expected = n_params(net.head) + n_params(net.backbone.stage2)
    assert count_parameters(net) == (total, expected)
    freeze(net, "head")  # a single name, not its letters
    assert count_parameters(net) == (total, n_params(net.backbone.stage2))
    freeze(net, ["backbone.stage2.1"])  # nested: the BatchNorm inside stage2
    assert not net.backbone.stage2[1].weight.requires_grad
    assert net.backbone.stage2[0].weight.requires_grad


def test_unknown_name_lists_close_matches():
    net = tiny_net()
    with pytest.raises(ValueError, match=r"backbone\.stag1.*close matches.*backbone\.stage1"):
        freeze(net, ["backbone.stag1"])
    with pytest.raises(ValueError, match="named_modules"):
        unfreeze(net, ["zzzzzz"])


def test_freeze_clears_stale_gradients():
    net = tiny_net()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    assert net.head.weight.grad is not None
    freeze(net, "head")
    assert net.head.weight.grad is None
    assert net.backbone.stem[0].weight.grad is not None


@pytest.mark.parametrize(
    "k, expected",
    [(0, ["head"]), (1, ["backbone.stage2", "head"]), (2, ["backbone.stage1", "backbone.stage2", "head"]),
     (3, BLOCKS + ["head"])],
)
def test_train_last(k, expected):
    net = tiny_net()
    freeze(net)  # train_last must also unfreeze what it keeps trainable
    train_last(net, k)
    assert trainable_blocks(net) == expected
    frozen = [name for name in BLOCKS if name not in expected]
    for name in frozen:
        assert not any(p.requires_grad for p in net.get_submodule(name).parameters())
    for name in expected:
        assert all(p.requires_grad for p in net.get_submodule(name).parameters())


@pytest.mark.parametrize("k", [-1, 4, 1.0, True, "1"])
def test_train_last_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k must be an int from 0"):
        train_last(tiny_net(), k)


@pytest.mark.parametrize(
    "start, stop, expected",
    [(0, 1, ["backbone.stem", "head"]), (1, 2, ["backbone.stage1", "head"]), (1, None, BLOCKS[1:] + ["head"]),
     (-1, None, ["backbone.stage2", "head"]), (0, 3, BLOCKS + ["head"])],
)
def test_train_blocks_trains_one_slice_and_the_head(start, stop, expected):
    net = tiny_net()
    train_blocks(net, start, stop)
    assert trainable_blocks(net) == expected
    for name in BLOCKS:
        flags = {p.requires_grad for p in net.get_submodule(name).parameters()}
        assert flags == {name in expected}, name
    optimizer = torch.optim.SGD(param_groups(net, lr=0.1), lr=0.1)
    before = {name: [p.clone() for p in net.get_submodule(name).parameters()] for name in BLOCKS}
    set_train_mode(net)
    nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for name in BLOCKS:  # a surgical step changes the chosen blocks and nothing else
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], net.get_submodule(name).parameters()))
        assert changed == (name in expected), name


def test_train_blocks_matches_train_last():
    a, b = tiny_net(), tiny_net()
    train_blocks(a, 1)
    train_last(b, 2)
    assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]


@pytest.mark.parametrize("start, stop", [(3, None), (2, 1), (1.0, 2), (0, True)])
def test_train_blocks_rejects_an_empty_or_odd_slice(start, stop):
    with pytest.raises(ValueError, match="train_blocks"):
        train_blocks(tiny_net(), start, stop)


def bn_state(bn: nn.BatchNorm2d) -> list[torch.Tensor]:
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def test_set_train_mode_keeps_frozen_batchnorm_statistics():
    net = tiny_net()
    train_last(net, 1)
    frozen_bns = [net.backbone.stem[1], net.backbone.stage1[1]]
    trained_bn = net.backbone.stage2[1]
    before = {id(bn): bn_state(bn) for bn in [*frozen_bns, trained_bn]}

    assert set_train_mode(net) is net
    assert net.training and net.head.training
    assert [bn.training for bn in frozen_bns] == [False, False]
    assert trained_bn.training
    optimizer = torch.optim.SGD(param_groups(net, lr=0.1), lr=0.1)
    x, y = torch.randn(8, 3, 8, 8) * 3 + 1, torch.randint(0, 3, (8,))
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()

    for bn in frozen_bns:
        for old, new in zip(before[id(bn)], bn_state(bn)):
            assert torch.equal(old, new)
    old_mean, old_var, old_count = before[id(trained_bn)]
    assert not torch.equal(old_mean, trained_bn.running_mean)
    assert not torch.equal(old_var, trained_bn.running_var)
    assert trained_bn.num_batches_tracked.item() == old_count.item() + 1

    set_train_mode(net, False)
    assert not any(m.training for m in net.modules())


def test_set_train_mode_other_batchnorms():
    net = nn.Sequential(nn.BatchNorm1d(4, affine=False), nn.SyncBatchNorm(4), nn.Linear(4, 4))
    freeze(net)
    set_train_mode(net)
    assert net[0].training  # no parameters: follows the mode
    assert not net[1].training  # SyncBatchNorm is a _BatchNorm too
    assert net[2].training


def test_gradual_unfreezing_schedule_with_all_params_in_optimizer():
    net = tiny_net()
    optimizer = torch.optim.SGD(param_groups(net, lr=0.01), lr=0.01)
    n_groups = len(optimizer.param_groups)
    cb = GradualUnfreezing(every=2, max_blocks=2)
    seen = []
    for epoch in range(7):
        cb.unfreeze(net, epoch, optimizer)
        seen.append(len(trainable_blocks(net)) - 1)
    assert seen == [0, 0, 1, 1, 2, 2, 2]
    assert len(optimizer.param_groups) == n_groups  # nothing had to be added
    assert cb.added_groups_ == []


def test_gradual_unfreezing_adds_missing_params_to_optimizer(caplog):
    net = tiny_net()
    cb = GradualUnfreezing(every=1)
    cb.unfreeze(net, 0, None)  # head only
    optimizer = torch.optim.AdamW(param_groups(net, lr=0.01, head_lr_mult=5, trainable_only=True), lr=0.01)
    assert [g["name"] for g in optimizer.param_groups] == ["head"]

    with caplog.at_level("WARNING", logger="d2lft.freeze"):
        cb.unfreeze(net, 1, optimizer)
    assert "not in the optimizer" in caplog.text
    stage2 = set(map(id, net.backbone.stage2.parameters()))
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert stage2 <= in_opt
    new_groups = optimizer.param_groups[1:]
    assert [g["name"] for g in new_groups] == ["unfrozen@epoch1", "unfrozen@epoch1.no_decay"]
    assert all(g["lr"] == pytest.approx(0.05) for g in new_groups)  # the smallest lr in use (head 0.01*5)
    assert new_groups[1]["weight_decay"] == 0.0

    before = net.backbone.stage2[0].weight.detach().clone()
    nn.functional.cross_entropy(net(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert not torch.equal(before, net.backbone.stage2[0].weight)

    cb.unfreeze(net, 2, optimizer)
    assert [g["name"] for g in optimizer.param_groups[3:]] == ["unfrozen@epoch2", "unfrozen@epoch2.no_decay"]
    cb.unfreeze(net, 2, optimizer)  # idempotent: nothing more to add
    assert len(optimizer.param_groups) == 5


def test_gradual_unfreezing_uses_given_lr():
    net = tiny_net()
    optimizer = torch.optim.SGD(net.head.parameters(), lr=1.0)
    GradualUnfreezing(every=1, lr=1e-4).unfreeze(net, 1, optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 1e-4, 1e-4]


def test_gradual_unfreezing_state_dict_resumes():
    net = tiny_net()
    cb = GradualUnfreezing(every=3)
    for epoch in range(7):
        cb.unfreeze(net, epoch, None)
    state = cb.state_dict()
    assert state["unfrozen"] == 2

    resumed, fresh_net = GradualUnfreezing(every=1), tiny_net()
    resumed.load_state_dict(state)
    assert resumed.every == 3
    resumed.unfreeze(fresh_net, 0, None)  # epoch counter restarted, state still wins
    assert trainable_blocks(fresh_net) == ["backbone.stage1", "backbone.stage2", "head"]


def test_gradual_unfreezing_validates():
    with pytest.raises(ValueError, match="every must be an int"):
        GradualUnfreezing(every=0)
    with pytest.raises(ValueError, match="lr must be"):
        GradualUnfreezing(lr=-1.0)


def test_train_last_on_efficientnet_lite0():
    from d2lft import models

    net = models.create_model("efficientnet_lite0", num_classes=2, pretrained=False)
    blocks = net.blocks()
    train_last(net, 2)
    assert trainable_blocks(net) == [name for name, _ in blocks[-2:]] + ["head"]
    total, trainable = count_parameters(net)
    expected = sum(n_params(m) for _, m in blocks[-2:]) + n_params(net.head)
    assert trainable == expected < total
    set_train_mode(net)
    frozen_bn = [m for _, b in blocks[:-2] for m in b.modules() if isinstance(m, nn.BatchNorm2d)]
    assert frozen_bn and not any(m.training for m in frozen_bn)
