"""Tiny `Net`s for the unit tests: real modules (convolutions, BatchNorm), small enough for one thread."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from d2lft.net import Net


def conv_bn_relu(cin: int, cout: int, *, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU())


def staged_net(num_classes: int = 3, *, conv_bias: bool = False) -> Net:
    """Stem and two stages (the `blocks`) with BatchNorm, pooled to 8 features, then a linear head."""
    torch.manual_seed(0)
    backbone = nn.Sequential(
        OrderedDict(
            stem=conv_bn_relu(3, 4, bias=conv_bias),
            stage1=conv_bn_relu(4, 8, bias=conv_bias),
            stage2=conv_bn_relu(8, 8, bias=conv_bias),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
        )
    )
    return Net(backbone, nn.Linear(8, num_classes), blocks=["stem", "stage1", "stage2"], num_features=8, name="tiny")


def tiny_net(num_outputs: int = 2, *, seed: int = 0, dropout: float = 0.0) -> Net:
    """The smallest net with what fine-tuning cares about: a BatchNorm stem, a stage, a dropout head."""
    torch.manual_seed(seed)
    backbone = nn.Sequential()
    backbone.add_module("stem", nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()))
    backbone.add_module("stage", nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()))
    backbone.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8, num_outputs))
    return Net(backbone, head, blocks=["stem", "stage"], num_features=8, name="tiny")
