"""Learning rates for fine-tuning: parameter groups, schedules, and the learning-rate finder.

* `param_groups` gives the head a larger learning rate than the pretrained backbone and, with
  ``layer_decay``, smaller rates for deeper (earlier) blocks. Every group carries a real ``"lr"``
  (not a scale factor that some other code must remember to apply) and a ``"name"``.
* `make_scheduler` builds a per-batch schedule from ``torch.optim.lr_scheduler``.
* `lr_find` sweeps the learning rate upward over a few batches and suggests one.
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
from tqdm.auto import tqdm

from d2lft.freeze import set_train_mode
from d2lft.net import Net

__all__ = [
    "param_groups",
    "make_scheduler",
    "schedule_curve",
    "SCHEDULERS",
    "lr_find",
    "LRFindResult",
]

SCHEDULERS = ("constant", "step", "cosine", "warmup_cosine", "onecycle")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive(name: str, value: Any, *, where: str) -> float:
    if not _is_real(value) or not (0 < value < math.inf):
        raise ValueError(f"{where}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, *, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- parameter groups


def param_groups(
    net: Net,
    *,
    lr: float,
    head_lr_mult: float = 10.0,
    layer_decay: float | None = None,
    weight_decay: float = 0.0,
    trainable_only: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with discriminative learning rates.

    Learning rates (``n`` = number of backbone blocks, block ``i`` counted from the top, so
    ``i = 0`` is the block next to the head):

    * head: ``lr * head_lr_mult``;
    * without `layer_decay`: the whole backbone ``lr`` (one group, ``"backbone"``);
    * with `layer_decay` ``d``: block ``i`` gets ``lr * d ** (i + 1)`` (one group per block,
      named like the block, e.g. ``"backbone.stage7"``); backbone parameters outside the listed
      blocks get the smallest rate, ``lr * d ** n`` (group ``"backbone.other"``).

    With ``weight_decay > 0`` each group is split: biases and norm weights (every parameter with
    ``ndim <= 1``) go to a ``"<name>.no_decay"`` group with ``weight_decay=0``. Every group sets
    ``weight_decay`` explicitly, so the optimizer's own default (AdamW: 0.01) does not apply.

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
            raise ValueError(f"{where}: layer_decay must be in (0, 1] (deeper blocks learn slower), "
                             f"got {layer_decay!r}")
    if not _is_real(weight_decay) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not (hasattr(net, "blocks") and hasattr(net, "head") and hasattr(net, "backbone")):
        raise TypeError(f"{where}: expected a d2lft.Net (with .backbone, .head, .blocks()), "
                        f"got {type(net).__name__}")

    # (group name, lr, modules) from input to output
    blocks = net.blocks()
    units: list[tuple[str, float, list[nn.Module]]] = []
    if layer_decay is None:
        units.append(("backbone", lr, [net.backbone]))
    else:
        n = len(blocks)
        for j, (name, block) in enumerate(blocks):
            i = n - 1 - j  # position from the top
            units.append((name, lr * layer_decay ** (i + 1), [block]))
        units.insert(0, ("backbone.other", lr * layer_decay**n, [net.backbone]))  # what no block claims
    units.append(("head", lr * head_lr_mult, [net.head]))

    # Assign each parameter once: blocks and head first, then the "backbone.other" catch-all.
    seen: set[int] = set()
    collected: dict[str, list[nn.Parameter]] = {}
    for name, _, modules in sorted(units, key=lambda u: u[0] == "backbone.other"):
        params = []
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen and (p.requires_grad or not trainable_only):
                    seen.add(id(p))
                    params.append(p)
        collected[name] = params

    groups: list[dict[str, Any]] = []
    for name, group_lr, _ in units:
        params = collected[name]
        if weight_decay > 0:
            parts = [(name, [p for p in params if p.ndim > 1], float(weight_decay)),
                     (f"{name}.no_decay", [p for p in params if p.ndim <= 1], 0.0)]
        else:
            parts = [(name, params, 0.0)]
        for part_name, part, wd in parts:
            if part:
                groups.append({"params": part, "lr": group_lr, "weight_decay": wd, "name": part_name})
    if not groups:
        raise ValueError(f"{where}: no parameters to optimise in {net.name!r}: all are frozen and "
                         "trainable_only=True; unfreeze some (d2lft.train_last) first")
    return groups


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
        raise ValueError(f"make_scheduler: unknown schedule {name!r}; choose one of {list(SCHEDULERS)}")
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
        raise ValueError(f"{where}: warmup_epochs must be >= 0 and less than epochs={epochs}, got {warmup_epochs!r}")
    if name == "warmup_cosine":
        warmup = round(warmup_epochs * steps_per_epoch)
        if warmup == 0:
            return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        if not 0 < warmup_start <= 1:
            raise ValueError(f"{where}: warmup_start must be in (0, 1], got {warmup_start!r}")
        warm = lr_scheduler.LinearLR(optimizer, start_factor=warmup_start, end_factor=1.0, total_iters=warmup)
        cool = lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
        return lr_scheduler.SequentialLR(optimizer, schedulers=[warm, cool], milestones=[warmup])

    # onecycle
    if warmup_epochs <= 0:
        raise ValueError(f"{where}: onecycle needs warmup_epochs > 0 (the rising part), got {warmup_epochs!r}")
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
    (``n`` points), and the first ``n // 10`` points are skipped: there the moving average has
    seen few batches and its noise would look like a steep fall. When fewer than 5 points precede
    the minimum, the slope is too noisy to trust and the suggestion is the learning rate at the
    minimum divided by 10.

    >>> lrs = [10.0 ** (e / 4) for e in range(-24, 1)]
    >>> losses = [2 / (1 + math.exp(2 * (math.log10(x) + 3))) + 0.01 * math.log10(x) ** 2 for x in lrs]
    >>> round(math.log10(suggest_lr(lrs, losses)))
    -3
    """
    if len(lrs) != len(losses) or not lrs:
        raise ValueError(f"suggest_lr: need as many losses as lrs (at least one), "
                         f"got {len(lrs)} and {len(losses)}")
    x = np.log10(np.asarray(lrs, dtype=float))
    y = np.asarray(losses, dtype=float)
    n = len(y)
    lowest = int(np.nanargmin(y))
    if lowest < 4:
        return float(lrs[lowest] / 10)
    h = max(1, n // 20)
    start = n // 10 if n // 10 < lowest else 0
    best, best_slope = lowest, 0.0
    for i in range(start, lowest + 1):
        lo, hi = max(i - h, 0), min(i + h, n - 1)
        if x[hi] > x[lo]:
            slope = (y[hi] - y[lo]) / (x[hi] - x[lo])
            if slope < best_slope:
                best, best_slope = i, slope
    return float(lrs[best])


def _cycle(loader: Iterable) -> Iterator:
    """Batches of `loader`, starting over at its end (without caching them, unlike itertools.cycle)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_find: the loader yielded no batches; check the dataset and batch_size")


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
    100; the loader is cycled if shorter) with ``ExponentialLR``. The optimizer ("sgd" with
    momentum 0.9, or "adamw") gets the trainable parameters in groups from
    ``param_groups(net, lr=..., head_lr_mult=..., layer_decay=...)``, so all groups are scaled
    together and keep their ratios; the reported ``lrs`` and ``suggestion`` are the base ``lr``
    to pass to `param_groups` with the same options.

    The loss is smoothed with an exponential moving average (weight `smooth` on the newest batch,
    bias-corrected); the sweep stops when the smoothed loss exceeds `diverge` times its lowest
    value or becomes non-finite. The suggestion is `suggest_lr` of the smoothed curve: the steepest
    descent before the minimum (or lr at the minimum / 10 when the curve is too short).

    Afterwards the net's weights and buffers (``state_dict``), each module's train/eval mode and
    the ``requires_grad`` flags are as before; gradients are cleared. Inputs go to `device`
    (default: where the net's parameters are).

    Example (``loader`` yields ``(images, targets)`` batches)::

        result = d2lft.lr_find(net, data.train)
        result.suggestion, result.plot()
    """
    where = "lr_find"
    start_lr = _check_positive("start_lr", start_lr, where=where)
    end_lr = _check_positive("end_lr", end_lr, where=where)
    if end_lr <= start_lr:
        raise ValueError(f"{where}: end_lr ({end_lr!r}) must be larger than start_lr ({start_lr!r})")
    num_iter = 100 if num_iter is None else _check_count("num_iter", num_iter, where=where, minimum=2)
    if not 0 < smooth <= 1:
        raise ValueError(f"{where}: smooth must be in (0, 1] (1 = no smoothing), got {smooth!r}")
    diverge = _check_positive("diverge", diverge, where=where)
    if diverge <= 1:
        raise ValueError(f"{where}: diverge must be > 1 (a factor over the lowest loss), got {diverge!r}")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"{where}: optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    loss_fn = nn.CrossEntropyLoss() if loss_fn is None else loss_fn
    first = next(net.parameters(), None)
    if first is None:
        raise ValueError(f"{where}: {type(net).__name__} has no parameters")
    device = torch.device(device) if device is not None else first.device

    groups = param_groups(net, lr=1.0, head_lr_mult=head_lr_mult, layer_decay=layer_decay,
                          weight_decay=weight_decay, trainable_only=True)
    ratios = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = start_lr * g["lr"]

    saved_state = copy.deepcopy(net.state_dict())
    saved_modes = {name: m.training for name, m in net.named_modules()}
    saved_device = first.device
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=start_lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=start_lr)
    gamma = (end_lr / start_lr) ** (1 / (num_iter - 1))
    scheduler = lr_scheduler.ExponentialLR(opt, gamma=gamma)
    lrs: list[float] = []
    raw: list[float] = []
    smoothed: list[float] = []
    stopped_early = False
    avg, best = 0.0, math.inf
    try:
        net.to(device)  # moves the parameters in place: the optimizer still holds them
        set_train_mode(net, True)
        batches = _cycle(loader)
        for step in tqdm(range(num_iter), desc="lr_find", disable=not progress, leave=False):
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            base_lr = opt.param_groups[0]["lr"] / ratios[0]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            scheduler.step()
            value = float(loss.detach())
            lrs.append(base_lr)
            raw.append(value)
            avg = (1 - smooth) * avg + smooth * value
            current = avg / (1 - (1 - smooth) ** (step + 1))
            smoothed.append(current)
            best = min(best, current)
            if not math.isfinite(current) or current > diverge * best:
                stopped_early = True
                break
    finally:
        opt.zero_grad(set_to_none=True)
        net.load_state_dict(saved_state)
        net.to(saved_device)
        for name, m in net.named_modules():
            m.training = saved_modes[name]
    finite = [(lr, s) for lr, s in zip(lrs, smoothed) if math.isfinite(s)]
    if not finite:
        raise RuntimeError(f"{where}: every loss was non-finite; check the data and loss_fn, or lower start_lr")
    suggestion = suggest_lr([lr for lr, _ in finite], [s for _, s in finite])
    return LRFindResult(lrs=lrs, losses=smoothed, suggestion=suggestion, raw_losses=raw,
                        stopped_early=stopped_early)
