"""Parameter-efficient fine-tuning: LoRA starts as the pretrained net, merges exactly; BitFit trains what it says."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import d2lft as ft
from d2lft.errors import ConfigError
from d2lft.freeze import count_parameters, set_train_mode, train_bias_and_norm
from d2lft.peft import LoRA, add_lora, merge_lora


def _pointwise_net(num_classes: int = 3) -> ft.Net:
    """BatchNorm, a 3x3 convolution, and pointwise ones: plain, strided and padded (with a bias)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        expand=nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        reduce=nn.Sequential(nn.Conv2d(16, 12, 1, stride=2, padding=1), nn.ReLU()),
        pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    ))
    return ft.Net(backbone, nn.Sequential(nn.Dropout(0.0), nn.Linear(12, num_classes)),
                  blocks=["stem", "expand", "reduce"], num_features=12, name="pointwise")


def _data(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, 10, 10, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      batch_size=8)


def test_a_net_with_lora_computes_exactly_what_the_pretrained_net_computes_before_training():
    base, net = _pointwise_net(), _pointwise_net()
    names = add_lora(net, rank=2, alpha=4)
    assert names == ["backbone.expand.0", "backbone.reduce.0"]
    x = torch.randn(4, 3, 10, 10)
    assert torch.equal(net.eval()(x), base.eval()(x))


def test_only_lora_and_the_head_train_and_their_count_is_rank_times_in_plus_out():
    net = _pointwise_net()
    add_lora(net, rank=2)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["backbone.expand.0.lora_a.weight", "backbone.expand.0.lora_b.weight",
                         "backbone.reduce.0.lora_a.weight", "backbone.reduce.0.lora_b.weight",
                         "head.1.weight", "head.1.bias"]
    head = 12 * 3 + 3
    assert count_parameters(net)[1] == 2 * (8 + 16) + 2 * (16 + 12) + head

    lora_head = _pointwise_net()
    assert add_lora(lora_head, rank=3, head="lora")[-1] == "head.1"
    assert count_parameters(lora_head)[1] == 3 * (8 + 16) + 3 * (16 + 12) + 3 * (12 + 3)
    frozen = _pointwise_net()
    add_lora(frozen, rank=1, head="frozen", targets=["backbone.expand.0"])
    assert count_parameters(frozen)[1] == 1 * (8 + 16)
    assert not set_train_mode(frozen).backbone.expand[1].training  # frozen BatchNorm keeps its statistics


def test_after_training_the_merged_net_computes_what_the_lora_net_computed():
    net = _pointwise_net()
    add_lora(net, rank=2, head="lora")
    frozen_before = net.backbone.expand[0].base.weight.detach().clone()
    ft.fit(net, _data(), epochs=2, lr=0.05, progress=False, best=None, seed=0)
    assert net.backbone.expand[0].lora_b.weight.abs().sum() > 0  # B has moved away from zero
    assert torch.equal(net.backbone.expand[0].base.weight, frozen_before)  # W has not

    x = torch.randn(4, 3, 10, 10)
    before = net.eval()(x)
    assert merge_lora(net) == 3
    assert not any(isinstance(m, LoRA) for m in net.modules())
    assert type(net.backbone.expand[0]) is nn.Conv2d and type(net.head[1]) is nn.Linear
    assert set(net.state_dict()) == set(_pointwise_net().state_dict())  # the pretrained architecture again
    assert torch.allclose(net.eval()(x), before, atol=1e-5)
    assert not torch.allclose(net.eval()(x), _pointwise_net().eval()(x), atol=1e-3)


def test_lora_on_efficientnet_lite0_wraps_its_pointwise_convolutions_and_starts_where_it_was():
    base = ft.create_model("efficientnet_lite0", num_classes=2)
    net = ft.create_model("efficientnet_lite0", num_classes=2)
    net.head.load_state_dict(base.head.state_dict())
    pointwise = {n: m for n, m in net.named_modules()
                 if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1}
    names = add_lora(net, rank=4)
    assert names == list(pointwise) and len(names) > 20
    head = sum(p.numel() for p in net.head.parameters())
    want = sum(4 * (m.in_channels + m.out_channels) for m in pointwise.values()) + head
    total, trainable = count_parameters(net)
    assert trainable == want and trainable < total / 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # B = 0; the wrapped layers run their BatchNorm unfolded: float rounding apart
        torch.testing.assert_close(net.eval()(x), base.eval()(x), rtol=0, atol=1e-5)


def test_add_lora_refuses_what_it_cannot_wrap_in_one_line():
    with pytest.raises(ConfigError, match="rank must be an int >= 1"):
        add_lora(_pointwise_net(), rank=0)
    with pytest.raises(ConfigError, match="1x1 nn.Conv2d"):
        add_lora(_pointwise_net(), targets=["backbone.stem.0"])  # a 3x3 convolution
    with pytest.raises(ConfigError, match="no submodule named 'backbone.expnd.0'.*close matches"):
        add_lora(_pointwise_net(), targets=["backbone.expnd.0"])
    with pytest.raises(ConfigError, match="head='full' is not one of"):
        add_lora(_pointwise_net(), head="full")
    net = _pointwise_net()
    add_lora(net)
    with pytest.raises(ConfigError, match="merge_lora"):
        add_lora(net)


def test_train_bias_and_norm_trains_biases_batchnorm_and_the_head_only():
    net = _pointwise_net()
    train_bias_and_norm(net)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["backbone.stem.1.weight", "backbone.stem.1.bias", "backbone.expand.1.weight",
                         "backbone.expand.1.bias", "backbone.reduce.0.bias", "head.1.weight", "head.1.bias"]
    assert count_parameters(net)[1] == 2 * 8 + 2 * 16 + 12 + 12 * 3 + 3
    assert set_train_mode(net).backbone.stem[1].training  # its BatchNorm trains, statistics included
    history = ft.fit(net, _data(), epochs=1, lr=0.01, progress=False, best=None)
    assert len(history) == 1
    with pytest.raises(ConfigError, match="expected a d2lft.Net"):
        train_bias_and_norm(nn.Linear(2, 2))
