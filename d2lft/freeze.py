"""Choose which parts of a model train: freeze by name or by depth, keep frozen BatchNorm still.

Freezing means ``requires_grad=False``: no gradient is computed for those weights, so every
torch optimizer skips them. Two details make freezing behave as a learner expects:

* a frozen BatchNorm layer in ``train()`` mode still updates its running mean and variance on
  every batch, so "frozen" weights would drift; `set_train_mode` puts such layers in eval mode;
* a parameter unfrozen mid-run must be in the optimizer; `d2lft.param_groups` includes every
  parameter by default, and `GradualUnfreezing` checks and adds a group when one is missing.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from d2lft.errors import ConfigError
from d2lft.net import Net

__all__ = [
    "freeze",
    "unfreeze",
    "train_last",
    "train_blocks",
    "train_bias_and_norm",
    "count_parameters",
    "set_train_mode",
    "freeze_batchnorm",
    "preserved",
    "trainable_blocks",
    "GradualUnfreezing",
]

logger = logging.getLogger(__name__)


def _select(module: nn.Module, names: Iterable[str] | str | None) -> list[nn.Module]:
    """The submodules called `names` (dotted, as in ``named_modules()``), or `module` itself."""
    if names is None:
        return [module]
    if isinstance(names, str):  # freeze(net, "head") means one name, not four letters
        names = [names]
    modules = dict(module.named_modules())
    selected = []
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
            hint = f"close matches: {close}" if close else "list them with [n for n, _ in net.named_modules()]"
            raise ConfigError(f"no submodule named {name!r} in {type(module).__name__}; {hint}")
        selected.append(modules[name])
    return selected


def _set_requires_grad(module: nn.Module, names: Iterable[str] | str | None, flag: bool) -> None:
    for sub in _select(module, names):
        for p in sub.parameters():
            p.requires_grad_(flag)
            if not flag:
                # A stale gradient would make the optimizer update a frozen weight once more.
                p.grad = None


def freeze(module: nn.Module, names: Iterable[str] | str | None = None) -> None:
    """Stop training all parameters of `module`, or of its submodules called `names`.

    Names are dotted, as in ``module.named_modules()`` (for a `Net`: ``"head"``,
    ``"backbone.stage3"`` ...). Gradients of frozen parameters are cleared, so optimizers skip them.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> freeze(net, ["0"])
    >>> count_parameters(net)
    (13, 4)
    """
    _set_requires_grad(module, names, False)


def unfreeze(module: nn.Module, names: Iterable[str] | str | None = None) -> None:
    """Train again all parameters of `module`, or of its submodules called `names`.

    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> freeze(net); unfreeze(net, "1")
    >>> count_parameters(net)
    (13, 4)
    """
    _set_requires_grad(module, names, True)


def train_last(net: Net, k: int) -> None:
    """Freeze the backbone except its last `k` blocks; the head always trains.

    ``k=0`` trains the head only (a linear probe); ``k=len(net.blocks())`` trains everything.

    >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> net = Net(backbone, nn.Linear(4, 2), blocks=["0", "1"], num_features=4, name="toy")
    >>> train_last(net, 1)
    >>> trainable_blocks(net)
    ['backbone.1', 'head']
    """
    blocks = net.blocks()
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(blocks):
        raise ConfigError(
            f"train_last: k must be an int from 0 (head only) to {len(blocks)} (all blocks of "
            f"{net.name!r}), got {k!r}"
        )
    if k == len(blocks):
        unfreeze(net)  # also parameters the block list does not cover
        return
    freeze(net.backbone)
    for _, block in blocks[len(blocks) - k :]:
        unfreeze(block)
    unfreeze(net.head)


def train_blocks(net: Net, start: int, stop: int | None = None) -> None:
    """Train only the blocks ``net.blocks()[start:stop]`` and the head; freeze the rest of the backbone.

    *Surgical* fine-tuning (Lee et al., 2022) trains one slice of the network: the first blocks,
    the middle ones or the last ones. `start` and `stop` count blocks from the input, as in a
    Python slice (``stop=None``: to the last block; negative values count from the end), so
    ``train_blocks(net, len(net.blocks()) - k)`` trains the same blocks as ``train_last(net, k)``.

    >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    >>> net = Net(backbone, nn.Linear(4, 2), blocks=["0", "1", "2"], num_features=4, name="toy")
    >>> train_blocks(net, 0, 1)
    >>> trainable_blocks(net)
    ['backbone.0', 'head']
    >>> train_blocks(net, 1)
    >>> trainable_blocks(net)
    ['backbone.1', 'backbone.2', 'head']
    """
    blocks = net.blocks()
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"train_blocks: {name} must be an int (a block index, as in a slice), got {value!r}")
    chosen = blocks[start:stop]
    if not chosen:
        raise ConfigError(
            f"train_blocks: blocks[{start}:{stop}] selects no block of {net.name!r}, which has {len(blocks)} "
            f"(0 to {len(blocks) - 1}); use train_last(net, 0) to train the head only"
        )
    freeze(net.backbone)
    for _, block in chosen:
        unfreeze(block)
    unfreeze(net.head)


_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def train_bias_and_norm(net: Net) -> None:
    """Train only the biases, the normalisation layers and the head; freeze every other weight.

    BitFit (Ben Zaken et al., 2022) fine-tunes the biases alone; convolutional nets with
    BatchNorm usually have no convolution biases, and their BatchNorm scales and shifts play
    that role, so both train here (about 1 % of the weights of a ResNet or EfficientNet). The
    normalisation layers keep learning their statistics too (`set_train_mode` leaves them in
    train mode because their parameters train).

    >>> backbone = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
    ...                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> net = Net(backbone, nn.Linear(4, 2), blocks=["0", "2"], num_features=4, name="toy")
    >>> train_bias_and_norm(net)
    >>> [n for n, p in net.named_parameters() if p.requires_grad]
    ['backbone.1.weight', 'backbone.1.bias', 'backbone.2.bias', 'head.weight', 'head.bias']
    """
    if not isinstance(net, Net):
        raise ConfigError(f"train_bias_and_norm: expected a d2lft.Net (it needs to know the head), got "
                          f"{type(net).__name__}")
    freeze(net.backbone)
    for module in net.backbone.modules():
        if isinstance(module, _NORMS):
            unfreeze(module)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    unfreeze(net.head)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` numbers of parameter values in `module`.

    >>> count_parameters(nn.Linear(3, 2))
    (8, 8)
    """
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return total, trainable


def set_train_mode(module: nn.Module, mode: bool = True) -> nn.Module:
    """``module.train(mode)``, except BatchNorm layers whose parameters are all frozen stay in eval.

    In train mode BatchNorm normalises with the batch statistics and updates its running mean and
    variance, even when its weights are frozen; a frozen layer should keep the statistics it was
    pretrained with. Use this instead of ``net.train()`` (`d2lft.fit` does). BatchNorm layers
    without parameters (``affine=False``) simply follow `mode`.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> freeze(net, "1")
    >>> set_train_mode(net)[1].training
    False
    """
    module.train(mode)
    if mode:
        for m in module.modules():
            if isinstance(m, _BatchNorm):  # includes SyncBatchNorm
                params = list(m.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    m.eval()
    return module


def freeze_batchnorm(module: nn.Module) -> int:
    """Freeze every BatchNorm layer of `module`: its weights, and (through `set_train_mode`) its statistics.

    Fine-tuning with small batches, or on images whose statistics differ from ImageNet's, can make
    the running mean and variance noisy; this keeps the pretrained ones (Keras's behaviour for a
    frozen layer) while the convolutions train. Returns the number of layers frozen.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> freeze_batchnorm(net), set_train_mode(net)[1].training, net[0].weight.requires_grad
    (1, False, True)
    """
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    for m in layers:
        for p in m.parameters():
            p.requires_grad_(False)
            p.grad = None
    return len(layers)


@contextmanager
def preserved(module: nn.Module) -> Iterator[nn.Module]:
    """Put back every layer's train/eval mode and every parameter's ``requires_grad`` and ``.grad`` on exit.

    The one way d2lft saves and restores a model's state around work that changes it
    (evaluation, prediction, feature caching, the learning-rate finder, the freeze explorer);
    frozen BatchNorm layers keep their eval mode because each layer gets its own mode back.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    >>> freeze(net, "1"); set_train_mode(net)[1].training
    False
    >>> with preserved(net):
    ...     _ = net.eval(); unfreeze(net)
    >>> net[0].training, net[1].training, net[1].weight.requires_grad
    (True, False, False)
    """
    modes = [(m, m.training) for m in module.modules()]
    params = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, flag, grad in params:
            p.requires_grad_(flag)
            p.grad = grad


def trainable_blocks(net: Net) -> list[str]:
    """Names of the blocks (and ``"head"``) that have at least one trainable parameter.

    >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> net = Net(backbone, nn.Linear(4, 2), blocks=["0", "1"], num_features=4, name="toy")
    >>> trainable_blocks(net)
    ['backbone.0', 'backbone.1', 'head']
    """
    return [name for name, params in net.parts() if name != "backbone.other" and any(p.requires_grad for p in params)]


class GradualUnfreezing:
    """Callback: train the head first, then unfreeze one more block from the top every `every` epochs.

    A `d2lft.fit` callback: its ``on_epoch_start(run)`` runs before each epoch trains (``run.epoch``
    counts from 0). During epochs ``0 .. every-1`` only the head trains, during ``every .. 2*every-1`` the head and
    the last block, and so on, up to `max_blocks` (default: all). It owns the net's
    ``requires_grad`` flags: every epoch start calls ``train_last(net, k)``. Call it before
    `set_train_mode` so newly unfrozen BatchNorm layers train in the same epoch.

    Every newly trainable parameter must be in the optimizer. With the default
    ``d2lft.param_groups(net, lr=...)`` all parameters already are; otherwise the missing ones are
    added as a new param group (the idea of Lightning's ``unfreeze_and_add_param_group``) with
    learning rate `lr`, or, when `lr` is None, the smallest learning rate the optimizer uses now,
    and a warning is logged (a scheduler made before does not rescale that group).

    ``state_dict()`` / ``load_state_dict()`` save and restore how many blocks are unfrozen, so a
    resumed run continues where it stopped.

    >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> net = Net(backbone, nn.Linear(4, 2), blocks=["0", "1"], num_features=4, name="toy")
    >>> cb = GradualUnfreezing(every=2)
    >>> for epoch in range(4):
    ...     cb.unfreeze(net, epoch)
    ...     print(epoch, trainable_blocks(net))
    0 ['head']
    1 ['head']
    2 ['backbone.1', 'head']
    3 ['backbone.1', 'head']
    """

    def __init__(self, every: int = 1, *, max_blocks: int | None = None, lr: float | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"GradualUnfreezing: every must be an int >= 1 (epochs per block), got {every!r}")
        if max_blocks is not None and (not isinstance(max_blocks, int) or max_blocks < 0):
            raise ConfigError(f"GradualUnfreezing: max_blocks must be None or an int >= 0, got {max_blocks!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
            raise ConfigError(f"GradualUnfreezing: lr must be None or a positive finite float, got {lr!r}")
        self.every = every
        self.max_blocks = max_blocks
        self.lr = lr
        self.unfrozen_ = 0  # blocks unfrozen so far
        self.added_groups_: list[str] = []

    def blocks_at(self, epoch: int, num_blocks: int) -> int:
        """How many blocks the schedule unfreezes for `epoch` (0-based) of a net with `num_blocks`."""
        limit = num_blocks if self.max_blocks is None else min(self.max_blocks, num_blocks)
        return min(epoch // self.every, limit)

    def on_epoch_start(self, run: Any) -> None:
        """Set the trainable blocks for ``run.epoch`` and make sure ``run.optimizer`` holds them."""
        self.unfreeze(run.net, run.epoch, run.optimizer)

    def unfreeze(self, net: Net, epoch: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Set the trainable blocks of `net` for `epoch` (0-based); add missing ones to `optimizer`."""
        k = max(self.unfrozen_, self.blocks_at(epoch, len(net.blocks())))
        if k != self.unfrozen_:
            logger.info("epoch %d: training the last %d block(s) and the head", epoch, k)
        train_last(net, k)
        self.unfrozen_ = k
        if optimizer is not None:
            self._add_missing(net, optimizer, epoch)

    def _add_missing(self, net: Net, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [(n, p) for n, p in net.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
        if not missing:
            return
        lr = self.lr if self.lr is not None else min(float(g["lr"]) for g in optimizer.param_groups)
        name = f"unfrozen@epoch{epoch}"
        decay = [p for n, p in missing if p.ndim > 1]
        no_decay = [p for n, p in missing if p.ndim <= 1]  # biases and norm weights
        for params, suffix, extra in ((decay, "", {}), (no_decay, ".no_decay", {"weight_decay": 0.0})):
            if params:
                optimizer.add_param_group({"params": params, "lr": lr, "name": name + suffix, **extra})
                self.added_groups_.append(name + suffix)
        logger.warning(
            "GradualUnfreezing: %d unfrozen parameter tensors were not in the optimizer; added them as "
            "param group %r with lr=%g (build the optimizer from d2lft.param_groups(net, lr=...) to "
            "include all parameters from the start)",
            len(missing),
            name,
            lr,
        )

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume: the settings and how many blocks are unfrozen."""
        return {"every": self.every, "max_blocks": self.max_blocks, "unfrozen": self.unfrozen_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`; the next `on_epoch_start` applies it to the net."""
        self.every = int(state["every"])
        self.max_blocks = state["max_blocks"]
        self.unfrozen_ = int(state["unfrozen"])

    def __repr__(self) -> str:
        return f"GradualUnfreezing(every={self.every}, max_blocks={self.max_blocks}, unfrozen={self.unfrozen_})"
