"""Learning rates for fine-tuning: parameter groups, schedules, and the learning-rate finder.

* `param_groups` gives the head a larger learning rate than the pretrained backbone and, with
  ``layer_decay``, smaller rates for deeper (earlier) blocks. Every group carries a real ``"lr"``
  (not a scale factor that some other code must remember to apply) and a ``"name"``.
* `make_optimizer` is the one place an optimizer is built from such groups (AdamW or SGD).
* `make_scheduler` builds a per-batch schedule from ``torch.optim.lr_scheduler``.
* `lr_find` sweeps the learning rate upward over a few batches of `d2lft.fit` and suggests one.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import lr_scheduler

from d2lft.errors import ConfigError
from d2lft.freeze import preserved
from d2lft.net import Net

__all__ = [
    "param_groups",
    "make_optimizer",
    "OPTIMIZERS",
    "make_scheduler",
    "schedule_curve",
    "SCHEDULERS",
    "lr_find",
    "LRFindResult",
]

SCHEDULERS = ("constant", "step", "cosine", "warmup_cosine", "onecycle")
OPTIMIZERS = ("adamw", "sgd")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive(name: str, value: Any, *, where: str) -> float:
    if not _is_real(value) or not (0 < value < math.inf):
        raise ConfigError(f"{where}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, *, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- parameter groups


def param_groups(
    net: nn.Module,
    *,
    lr: float,
    head_lr_mult: float = 10.0,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    trainable_only: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with discriminative learning rates.

    Learning rates for a `Net` (``n`` = number of backbone blocks, block ``i`` counted from the
    top, so ``i = 0`` is the block next to the head):

    * head: ``lr * head_lr_mult``;
    * without `layer_decay`: the whole backbone ``lr`` (one group, ``"backbone"``);
    * with `layer_decay` ``d``: block ``i`` gets ``lr * d ** (i + 1)`` (one group per block,
      named like the block, e.g. ``"backbone.stage7"``): the block next to the head ``lr * d``,
      the first block ``lr * d ** n``; backbone parameters outside the listed blocks get the
      smallest rate, ``lr * d ** n`` (group ``"backbone.other"``).

    Any other module gets one group, ``"params"``, at ``lr``. With ``weight_decay > 0`` each group
    is split: biases and norm weights (every parameter with ``ndim <= 1``) go to a
    ``"<name>.no_decay"`` group with ``weight_decay=0``. Every group sets ``weight_decay``
    explicitly, so the optimizer's own default (AdamW: 0.01) does not apply.

    By default frozen parameters are included too: their ``grad`` is None, so torch optimizers
    skip them, and unfreezing them later needs no change to the optimizer. ``trainable_only=True``
    leaves them out (empty groups are dropped).

    >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> net = Net(backbone, nn.Linear(4, 2), blocks=["0", "1"], num_features=4, name="toy")
    >>> [(g["name"], g["lr"]) for g in param_groups(net, lr=0.01, layer_decay=0.5)]
    [('backbone.0', 0.0025), ('backbone.1', 0.005), ('head', 0.1)]
    """
    where = "param_groups"
    lr = _check_positive("lr", lr, where=where)
    head_lr_mult = _check_positive("head_lr_mult", head_lr_mult, where=where)
    if layer_decay is not None:
        layer_decay = _check_positive("layer_decay", layer_decay, where=where)
        if layer_decay > 1:
            raise ConfigError(f"{where}: layer_decay must be in (0, 1] (deeper blocks learn slower), "
                              f"got {layer_decay!r}")
    if not _is_real(weight_decay) or not 0 <= weight_decay < math.inf:
        raise ConfigError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not isinstance(net, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module (a d2lft.Net gets per-block rates), got {type(net).__name__}")

    # (group name, lr, parameters) from input to output
    if not isinstance(net, Net):
        units = [("params", lr, list(net.parameters()))]
    elif layer_decay is None:
        units = [("backbone", lr, [p for name, ps in net.parts() if name != "head" for p in ps])]
        units.append(("head", lr * head_lr_mult, dict(net.parts())["head"]))
    else:
        parts = net.parts()
        n = len(net.block_names)
        rates = {name: lr * layer_decay ** (n - j) for j, (name, _) in enumerate(parts[:n])}
        rates.update({"backbone.other": lr * layer_decay**n, "head": lr * head_lr_mult})
        order = ["backbone.other"] + [name for name, _ in parts if name != "backbone.other"]
        units = [(name, rates[name], dict(parts)[name]) for name in order if name in dict(parts)]

    groups: list[dict[str, Any]] = []
    for name, group_lr, params in units:
        params = [p for p in params if p.requires_grad or not trainable_only]
        if weight_decay > 0:
            split = [(name, [p for p in params if p.ndim > 1], float(weight_decay)),
                     (f"{name}.no_decay", [p for p in params if p.ndim <= 1], 0.0)]
        else:
            split = [(name, params, 0.0)]
        for part_name, part, wd in split:
            if part:
                groups.append({"params": part, "lr": group_lr, "weight_decay": wd, "name": part_name})
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError(f"{where}: {getattr(net, 'name', type(net).__name__)!r} has no trainable parameters "
                          "(all are frozen); unfreeze some first (d2lft.unfreeze / d2lft.train_last)")
    return groups


def make_optimizer(groups: list[dict[str, Any]] | Iterable[nn.Parameter], name: str = "adamw", *,
                   lr: float | None = None) -> torch.optim.Optimizer:
    """An optimizer over `groups` (from `param_groups`, whose learning rates and decays it keeps).

    ``"adamw"``: ``torch.optim.AdamW``; ``"sgd"``: ``torch.optim.SGD`` with momentum 0.9. `lr` is
    only needed for plain parameters (groups carry their own).

    >>> net = nn.Linear(2, 2)
    >>> make_optimizer(param_groups(net, lr=0.1), "sgd").param_groups[0]["lr"]
    0.1
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer={name!r}: expected one of {OPTIMIZERS}")
    options = {} if lr is None else {"lr": lr}
    if name == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, **options)
    return torch.optim.AdamW(groups, **options)


# ----------------------------------------------------------------------------- schedules


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1,
    warmup_start: float = 0.01,
    step_epochs: int | None = None,
    gamma: float = 0.1,
) -> lr_scheduler.LRScheduler:
    """A learning-rate schedule from ``torch.optim.lr_scheduler``, to be stepped once per batch.

    With ``T = epochs * steps_per_epoch`` batches, ``W = round(warmup_epochs * steps_per_epoch)``
    and each group's current ``lr``, the rate at batch ``s`` (0-based) is:

    * ``"constant"``: ``lr`` (`ConstantLR` with factor 1);
    * ``"step"``: ``lr * gamma ** (s // (step_epochs * steps_per_epoch))`` (`StepLR`);
      `step_epochs` defaults to ``max(1, epochs // 3)``;
    * ``"cosine"``: ``lr * (1 + cos(pi * s / T)) / 2`` (`CosineAnnealingLR`);
    * ``"warmup_cosine"``: linear from ``lr * warmup_start`` to ``lr`` over ``W`` batches
      (`LinearLR`), then cosine from ``lr`` over the remaining ``T - W`` (`SequentialLR`);
    * ``"onecycle"``: `OneCycleLR` with ``max_lr`` = each group's lr (so discriminative rates keep
      their ratios), rising for ``warmup_epochs`` (``pct_start = warmup_epochs / epochs``) from
      ``max_lr / 25``, then annealing to ``max_lr / 25e4``; momentum (or Adam's beta1) cycles too
      when the optimizer has one.

    >>> opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> sched = make_scheduler(opt, "cosine", epochs=2, steps_per_epoch=5)
    >>> type(sched).__name__
    'CosineAnnealingLR'
    """
    where = f"make_scheduler({name!r})"
    if name not in SCHEDULERS:
        raise ConfigError(f"make_scheduler: unknown schedule {name!r}; choose one of {list(SCHEDULERS)}")
    epochs = _check_count("epochs", epochs, where=where)
    steps_per_epoch = _check_count("steps_per_epoch", steps_per_epoch, where=where)
    total = epochs * steps_per_epoch

    if name == "constant":
        return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if name == "step":
        if step_epochs is None:
            step_epochs = max(1, epochs // 3)
        step_epochs = _check_count("step_epochs", step_epochs, where=where)
        gamma = _check_positive("gamma", gamma, where=where)
        return lr_scheduler.StepLR(optimizer, step_size=step_epochs * steps_per_epoch, gamma=gamma)
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)

    if not _is_real(warmup_epochs) or not 0 <= warmup_epochs < epochs:
        raise ConfigError(f"{where}: warmup_epochs must be >= 0 and less than epochs={epochs}, got {warmup_epochs!r}")
    if name == "warmup_cosine":
        warmup = round(warmup_epochs * steps_per_epoch)
        if warmup == 0:
            return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        if not 0 < warmup_start <= 1:
            raise ConfigError(f"{where}: warmup_start must be in (0, 1], got {warmup_start!r}")
        warm = lr_scheduler.LinearLR(optimizer, start_factor=warmup_start, end_factor=1.0, total_iters=warmup)
        cool = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
        return lr_scheduler.SequentialLR(optimizer, schedulers=[warm, cool], milestones=[warmup])

    # onecycle
    if warmup_epochs <= 0:
        raise ConfigError(f"{where}: onecycle needs warmup_epochs > 0 (the rising part), got {warmup_epochs!r}")
    defaults = optimizer.defaults
    has_momentum = "betas" in defaults or defaults.get("momentum", 0) > 0
    return lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[float(g["lr"]) for g in optimizer.param_groups],
        total_steps=total,
        pct_start=warmup_epochs / epochs,
        cycle_momentum=has_momentum,
    )


def schedule_curve(
    name: str, *, epochs: int, steps_per_epoch: int, lr: float = 0.1, **kwargs: Any
) -> list[float]:
    """The learning rate at each batch of schedule `name` (for plotting), starting from `lr`.

    >>> [round(x, 3) for x in schedule_curve("step", epochs=2, steps_per_epoch=2, step_epochs=1)]
    [0.1, 0.1, 0.01, 0.01]
    """
    lr = _check_positive("lr", lr, where="schedule_curve")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = make_scheduler(optimizer, name, epochs=epochs, steps_per_epoch=steps_per_epoch, **kwargs)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check happy
        scheduler.step()
    return lrs


# ----------------------------------------------------------------------------- lr finder


@dataclass
class LRFindResult:
    """What `lr_find` measured.

    Attributes:
        lrs: base learning rate at each batch (the ``lr`` you would pass to `param_groups`).
        losses: smoothed training loss after each batch.
        raw_losses: the loss of each batch as measured.
        suggestion: the suggested base learning rate (see `lr_find`).
        stopped_early: True when the sweep stopped because the loss diverged.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float
    raw_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def plot(self, *, ax=None):
        """The loss-vs-learning-rate curve with the suggestion marked (see `d2lft.plot.plot_lr_find`)."""
        from d2lft.plot import plot_lr_find

        return plot_lr_find(self, ax=ax)


def suggest_lr(lrs: list[float], losses: list[float]) -> float:
    """The learning rate where the smoothed loss falls fastest (per decade of lr), before its minimum.

    The slope at point ``i`` is measured over a window ``i - h .. i + h`` with ``h = max(1, n // 20)``
    (``n`` points). The first ``n // 10`` points are skipped, for the minimum too (fastai's
    ``skip_start``): there the moving average has seen a batch or two, and one lucky first batch
    would look like the lowest loss of the sweep, or its noise like a steep fall. When fewer than 5
    points precede the minimum, the slope is too noisy to trust and the suggestion is the learning
    rate at the minimum divided by 10.

    >>> lrs = [10.0 ** (e / 4) for e in range(-24, 1)]
    >>> losses = [2 / (1 + math.exp(2 * (math.log10(x) + 3))) + 0.01 * math.log10(x) ** 2 for x in lrs]
    >>> round(math.log10(suggest_lr(lrs, losses)))
    -3
    """
    if len(lrs) != len(losses) or not lrs:
        raise ConfigError(f"suggest_lr: need as many losses as lrs (at least one), "
                         f"got {len(lrs)} and {len(losses)}")
    x = np.log10(np.asarray(lrs, dtype=float))
    y = np.asarray(losses, dtype=float)
    n = len(y)
    start = n // 10
    lowest = start + int(np.nanargmin(y[start:]))
    if lowest - start < 4:
        return float(lrs[lowest] / 10)
    h = max(1, n // 20)
    best, best_slope = lowest, 0.0
    for i in range(start, lowest + 1):
        lo, hi = max(i - h, 0), min(i + h, n - 1)
        if x[hi] > x[lo]:
            slope = (y[hi] - y[lo]) / (x[hi] - x[lo])
            if slope < best_slope:
                best, best_slope = i, slope
    return float(lrs[best])


class _Batches:
    """`num_iter` batches of `loader`, starting over at its end (without caching them)."""

    def __init__(self, loader: Iterable, num_iter: int) -> None:
        self.loader, self.num_iter = loader, num_iter

    def __len__(self) -> int:
        return self.num_iter

    def __iter__(self) -> Iterator:
        given = 0
        while given < self.num_iter:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
                given += 1
                if given == self.num_iter:
                    return
            if empty:
                raise ConfigError("lr_find: the loader yielded no batches; check the dataset and batch_size")


class LRFinder:
    """The learning-rate range test as a `d2lft.fit` callback: record each batch's loss, stop on divergence.

    The learning rate of batch ``i`` is ``start_lr * gamma ** i`` (an ``ExponentialLR`` made by
    `lr_find`); the loss is smoothed with an exponential moving average (weight `smooth` on the
    newest batch, bias-corrected) and the run stops when it exceeds `diverge` times its lowest
    value or becomes non-finite.
    """

    def __init__(self, *, start_lr: float, gamma: float, smooth: float, diverge: float) -> None:
        self.start_lr, self.gamma, self.smooth, self.diverge = start_lr, gamma, smooth, diverge
        self.lrs_: list[float] = []
        self.raw_: list[float] = []
        self.smoothed_: list[float] = []
        self.diverged_ = False
        self._avg, self._best = 0.0, math.inf

    def on_batch_end(self, run: Any) -> None:
        value = float(run.loss)
        self.lrs_.append(self.start_lr * self.gamma ** len(self.lrs_))
        self.raw_.append(value)
        self._avg = (1 - self.smooth) * self._avg + self.smooth * value
        current = self._avg / (1 - (1 - self.smooth) ** len(self.raw_))
        self.smoothed_.append(current)
        self._best = min(self._best, current)
        if not math.isfinite(current) or current > self.diverge * self._best:
            from d2lft.callbacks import StopReason

            self.diverged_ = True
            run.stop, run.stop_message = StopReason.CALLBACK, "lr_find: the loss diverged"


def lr_find(
    net: Net,
    loader: Iterable,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    start_lr: float = 1e-6,
    end_lr: float = 1.0,
    num_iter: int | None = None,
    device: torch.device | str | None = None,
    optimizer: str = "sgd",
    head_lr_mult: float = 1.0,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    smooth: float = 0.05,
    diverge: float = 4.0,
    progress: bool = True,
) -> LRFindResult:
    """Train briefly with an exponentially growing learning rate and suggest one; the net is restored.

    The base learning rate grows from `start_lr` to `end_lr` over `num_iter` batches (default
    100; the loader is cycled if shorter) with ``ExponentialLR``, in `d2lft.fit` with an
    `LRFinder` callback (so the sweep runs exactly like training: same step, precision and
    memory format). The optimizer (`make_optimizer`: "sgd" or "adamw") gets the trainable
    parameters in groups from ``param_groups(net, lr=..., head_lr_mult=..., layer_decay=...)``,
    so all groups are scaled together and keep their ratios; the reported ``lrs`` and
    ``suggestion`` are the base ``lr`` to pass to `param_groups` with the same options.

    The suggestion is `suggest_lr` of the smoothed curve: the steepest descent before the minimum
    (or lr at the minimum / 10 when the curve is too short). Afterwards the net's weights and
    buffers, each module's train/eval mode, the ``requires_grad`` flags and the device are as
    before.

    Example (``loader`` yields ``(images, targets)`` batches)::

        result = d2lft.lr_find(net, data.train)
        result.suggestion, result.plot()
    """
    from d2lft.train import fit

    where = "lr_find"
    start_lr = _check_positive("start_lr", start_lr, where=where)
    end_lr = _check_positive("end_lr", end_lr, where=where)
    if end_lr <= start_lr:
        raise ConfigError(f"{where}: end_lr ({end_lr!r}) must be larger than start_lr ({start_lr!r})")
    num_iter = 100 if num_iter is None else _check_count("num_iter", num_iter, where=where, minimum=2)
    if not 0 < smooth <= 1:
        raise ConfigError(f"{where}: smooth must be in (0, 1] (1 = no smoothing), got {smooth!r}")
    diverge = _check_positive("diverge", diverge, where=where)
    if diverge <= 1:
        raise ConfigError(f"{where}: diverge must be > 1 (a factor over the lowest loss), got {diverge!r}")
    first = next(net.parameters(), None)
    if first is None:
        raise ConfigError(f"{where}: {type(net).__name__} has no parameters")
    groups = param_groups(net, lr=1.0, head_lr_mult=head_lr_mult, layer_decay=layer_decay,
                          weight_decay=weight_decay, trainable_only=True)
    for g in groups:
        g["lr"] = start_lr * g["lr"]
    opt = make_optimizer(groups, optimizer)
    gamma = (end_lr / start_lr) ** (1 / (num_iter - 1))
    finder = LRFinder(start_lr=start_lr, gamma=gamma, smooth=smooth, diverge=diverge)
    saved_state, saved_device = copy.deepcopy(net.state_dict()), first.device
    with preserved(net):
        try:
            fit(net, _Batches(loader, num_iter), epochs=1, optimizer=opt, loss_fn=loss_fn, best=None,
                scheduler=lr_scheduler.ExponentialLR(opt, gamma=gamma), device=device or saved_device,
                callbacks=[finder], progress=progress)
        finally:
            net.load_state_dict(saved_state)
            net.to(saved_device)
    finite = [(lr, s) for lr, s in zip(finder.lrs_, finder.smoothed_) if math.isfinite(s)]
    if not finite:
        raise ConfigError(f"{where}: every loss was non-finite; check the data and loss_fn, or lower start_lr")
    suggestion = suggest_lr([lr for lr, _ in finite], [s for _, s in finite])
    return LRFindResult(lrs=finder.lrs_, losses=finder.smoothed_, suggestion=suggestion, raw_losses=finder.raw_,
                        stopped_early=finder.diverged_)
