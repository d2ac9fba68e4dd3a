"""Parameter-efficient fine-tuning: LoRA on the pointwise convolutions (and the head).

LoRA (Hu et al., 2022) freezes a pretrained weight ``W`` and learns a low-rank update instead:
``W x + (alpha / rank) * B A x`` with ``A`` of shape ``(rank, in)`` and ``B`` of shape
``(out, rank)``. ``B`` starts at zero, so before training the net computes exactly what the
pretrained one did; ``rank * (in + out)`` numbers train per layer instead of ``in * out``.
After training, `merge_lora` folds ``(alpha / rank) * B A`` into ``W``: the merged net has the
pretrained architecture and costs nothing extra at inference.

In a convolutional net most weights sit in the 1x1 ("pointwise") convolutions, which are
matrix products at every pixel, so that is where `add_lora` puts the updates by default.
The other parameter-efficient choice, training only biases and normalisation layers (BitFit),
is a freezing helper: `d2lft.freeze.train_bias_and_norm`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from d2lft.errors import ConfigError
from d2lft.freeze import _select, freeze, unfreeze
from d2lft.net import Net

__all__ = ["LoRA", "add_lora", "merge_lora", "HEAD_MODES"]

HEAD_MODES = ("train", "lora", "frozen")


def _is_pointwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


class LoRA(nn.Module):
    """A frozen ``nn.Linear`` or pointwise ``nn.Conv2d`` plus a trainable low-rank update.

    ``forward(x) = base(x) + (alpha / rank) * lora_b(lora_a(x))``; ``lora_a`` starts random
    (Kaiming-uniform, as in the LoRA reference code), ``lora_b`` at zero.

    >>> layer = LoRA(nn.Linear(6, 4), rank=2, alpha=2)
    >>> x = torch.randn(3, 6)
    >>> torch.equal(layer(x), layer.base(x)), [n for n, p in layer.named_parameters() if p.requires_grad]
    (True, ['lora_a.weight', 'lora_b.weight'])
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            a = nn.Linear(base.in_features, rank, bias=False)
            b = nn.Linear(rank, base.out_features, bias=False)
        elif _is_pointwise(base):
            # the stride and padding of the layer go to A, so that B A x lines up with W x
            a = nn.Conv2d(base.in_channels, rank, 1, stride=base.stride, padding=base.padding,
                          padding_mode=base.padding_mode, bias=False)
            b = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise ConfigError(f"LoRA: wraps nn.Linear or a 1x1 nn.Conv2d with groups=1, got {base!r}")
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.base = base
        self.lora_a = a.to(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_b = b.to(device=base.weight.device, dtype=base.weight.dtype)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        freeze(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / rank) * B A``, shaped like the base weight."""
        b = self.lora_b.weight.reshape(self.lora_b.weight.shape[0], self.rank)
        a = self.lora_a.weight.reshape(self.rank, -1)
        return (self.scale * b @ a).reshape(self.base.weight.shape)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight (changed in place and returned)."""
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def add_lora(net: Net, *, rank: int = 4, alpha: float | None = None, targets: Iterable[str] | None = None,
             head: str = "train") -> list[str]:
    """Wrap layers of `net` in `LoRA` (in place) and freeze everything else; returns the wrapped names.

    `targets` are dotted module names (``[n for n, _ in net.named_modules()]``); None means
    every pointwise (1x1, ungrouped) convolution of the backbone. `alpha` defaults to `rank`
    (scale 1). `head`: ``"train"`` trains the whole head (a new head has nothing pretrained to
    keep), ``"lora"`` puts LoRA on its linear layers too, ``"frozen"`` freezes it. Train with
    `d2lft.fit` as usual (only the trainable parameters change), then `merge_lora`.

    >>> backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> net = Net(backbone, nn.Linear(16, 2), blocks=["0", "1"], num_features=16, name="toy")
    >>> add_lora(net, rank=2)
    ['backbone.1']
    >>> from d2lft.freeze import count_parameters
    >>> count_parameters(net)[1] == 2 * (8 + 16) + (16 * 2 + 2)    # LoRA on 8 -> 16 channels, and the head
    True
    """
    if not isinstance(net, Net):
        raise ConfigError(f"add_lora: expected a d2lft.Net (it needs to know the head), got {type(net).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ConfigError(f"add_lora: rank must be an int >= 1 (4 to 16 is usual), got {rank!r}")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ConfigError(f"add_lora: alpha must be a positive number (None: the rank), got {alpha!r}")
    if head not in HEAD_MODES:
        raise ConfigError(f"add_lora: head={head!r} is not one of {list(HEAD_MODES)}")
    if any(isinstance(m, LoRA) for m in net.modules()):
        raise ConfigError("add_lora: the net already holds LoRA layers; merge_lora(net) first")

    if targets is None:
        names = [f"backbone.{n}" for n, m in net.backbone.named_modules() if _is_pointwise(m)]
    else:
        targets = [targets] if isinstance(targets, str) else list(targets)
        _select(net, targets)  # unknown names fail here, with close matches
        names = targets
    if head == "lora":
        names += [f"head.{n}" if n else "head" for n, m in net.head.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"add_lora: {net.name!r} has no pointwise convolution to wrap; pass targets=[...] "
                          "(names of nn.Linear or 1x1 nn.Conv2d layers)")
    freeze(net)
    for name in names:
        _set_submodule(net, name, LoRA(net.get_submodule(name), rank=int(rank), alpha=alpha))
    if head == "train":
        unfreeze(net.head)
    return names


def merge_lora(net: nn.Module) -> int:
    """Fold every `LoRA` update of `net` into its base layer and remove the wrappers (in place).

    The merged net computes the same function as before (up to rounding) with the original
    architecture, so it saves, loads and exports like the pretrained one. The base weights stay
    frozen (``requires_grad=False``) as `add_lora` left them. Returns the number of layers merged.

    >>> layer = LoRA(nn.Linear(3, 2), rank=1, alpha=1)
    >>> net = nn.Sequential(layer); _ = nn.init.ones_(layer.lora_b.weight); x = torch.randn(4, 3)
    >>> before = net(x)
    >>> merge_lora(net), type(net[0]).__name__, torch.allclose(net(x), before, atol=1e-6)
    (1, 'Linear', True)
    """
    wrapped = [(name, m) for name, m in net.named_modules() if isinstance(m, LoRA)]
    for name, module in wrapped:
        _set_submodule(net, name, module.merged())
    return len(wrapped)
