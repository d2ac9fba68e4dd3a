"""Callbacks: small objects `d2lft.fit` calls at four moments of a run.

A callback has any of these methods; each receives the `Run` (the net, the optimizer, the
history, the epoch, and a ``stop`` field a callback may set to end the run)::

    on_epoch_start(run)   # before epoch run.epoch (counted from 0) trains
    on_batch_end(run)     # after each training step; run.loss is that batch's loss (a tensor)
    on_epoch_end(run)     # after validation; run.history holds the epoch's numbers
    on_fit_end(run)       # once, also after an early stop, a non-finite loss or Ctrl-C

A callback with ``state_dict()``/``load_state_dict()`` is saved in checkpoints and restored on
resume. `fit` builds its own features from the callbacks below (best weights and early stopping,
checkpoints, the progress bar); `d2lft.GradualUnfreezing`, `d2lft.lr_find` and
``d2lft.plot.LivePlot`` are callbacks too.

>>> class Count:
...     n = 0
...     def on_batch_end(self, run):
...         self.n += 1
"""
from __future__ import annotations

import enum
import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2lft import distributed
from d2lft.checkpoint import save_checkpoint
from d2lft.errors import ConfigError

__all__ = ["Run", "StopReason", "EarlyStopping", "Checkpoint", "ProgressBar", "call", "EVENTS"]

EVENTS = ("on_epoch_start", "on_batch_end", "on_epoch_end", "on_fit_end")
MONITORS = {"val_loss": "min", "val_acc": "max", "val_mae": "min"}


class StopReason(str, enum.Enum):
    """Why a run ended before its last epoch (a value, not prose: ``History.stop_reason``)."""

    EARLY_STOPPING = "early_stopping"
    NON_FINITE_LOSS = "non_finite_loss"
    INTERRUPTED = "interrupted"
    CALLBACK = "callback"


@dataclass
class Run:
    """The state of a `fit` run, as callbacks see it."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    history: Any
    epochs: int
    batches: int | None = None  # per epoch, when the loader has a length
    epoch: int = 0
    loss: torch.Tensor | None = None
    stop: StopReason | None = None
    stop_message: str | None = None
    generators: list = field(default_factory=list)


def call(callbacks: Iterable[Any], event: str, run: Run) -> None:
    """Call ``event(run)`` on every callback that has it, in order."""
    for cb in callbacks:
        method = getattr(cb, event, None)
        if method is not None:
            method(run)


def check_callbacks(callbacks: Iterable[Any]) -> list:
    callbacks = list(callbacks or ())
    for cb in callbacks:
        if isinstance(cb, type):
            raise TypeError(f"fit: callbacks must be instances; got the class {cb.__name__} (write {cb.__name__}())")
        if not any(hasattr(cb, e) for e in EVENTS):
            raise TypeError(f"fit: callback {cb!r} has none of the methods {', '.join(EVENTS)} (each takes the run)")
    return callbacks


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


class EarlyStopping:
    """Keep the weights of the best epoch by `monitor`; stop after `patience` epochs without improvement.

    `monitor` is ``"val_loss"``, ``"val_acc"`` or ``"val_mae"``; None (or a run without
    validation) counts the last epoch as the best. `patience` None never stops. With
    `restore_best` the best weights (a copy on the CPU) are put back when the run ends, however it
    ends. `fit(best=..., early_stopping=...)` makes one of these.

    >>> stopper = EarlyStopping(patience=2, monitor="val_loss")
    >>> [stopper.update(v, epoch=e) for e, v in enumerate([0.9, 0.7, 0.8, 0.75], start=1)]
    [True, True, False, False]
    >>> stopper.should_stop, stopper.best_epoch, stopper.best_value
    (True, 2, 0.7)
    """

    def __init__(self, patience: int | None = None, *, monitor: str | None = "val_loss",
                 restore_best: bool = True) -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"early_stopping: patience must be None or an int >= 1 (epochs), got {patience!r}")
        if monitor is not None and monitor not in MONITORS:
            raise ConfigError(f"best/monitor={monitor!r} is not one of {list(MONITORS)} (or None: the last epoch)")
        self.patience = patience
        self.monitor = monitor
        self.restore_best = restore_best
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, value: float | None, *, epoch: int) -> bool:
        """Record `value` for `epoch` (None: no validation, the epoch counts as the best); True when it is a new best."""
        if value is None:
            self.best_epoch, self.bad_epochs = int(epoch), 0
            return True
        better = self.best_value is None or (
            value < self.best_value if MONITORS[self.monitor] == "min" else value > self.best_value
        )
        if better and not math.isnan(value):
            self.best_value, self.best_epoch, self.bad_epochs = float(value), int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def on_epoch_start(self, run: Run) -> None:
        if self.restore_best and self.best_state is None:  # what to go back to if the first epoch goes wrong
            self.best_state = _cpu_copy(run.net.state_dict())

    def on_epoch_end(self, run: Run) -> None:
        h = run.history
        value = getattr(h, self.monitor)[-1] if self.monitor is not None else None
        if self.update(value, epoch=len(h)) and self.restore_best:
            self.best_state = _cpu_copy(run.net.state_dict())
        h.best_epoch, h.best_value = self.best_epoch, self.best_value
        if self.should_stop:
            run.stop = StopReason.EARLY_STOPPING
            run.stop_message = (f"{self.monitor} did not improve for {self.patience} epochs "
                                f"(best {self.best_value:.4g} at epoch {self.best_epoch})")

    def on_fit_end(self, run: Run) -> None:
        # After a stop the weights may have moved on (part of an epoch, a NaN step): go back too.
        moved = run.stop is not None or self.best_epoch != len(run.history)
        if self.restore_best and self.best_state is not None and moved:
            run.net.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "monitor": self.monitor, "best_value": self.best_value,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])


class Checkpoint:
    """Save the run to `path` after every epoch (last and best weights, optimizer, scheduler, callbacks,
    random states), so `fit(resume=path)` continues exactly where it stopped.

    `fit(checkpoint=path)` makes one; pass ``fit(checkpoint=Checkpoint(path, extra={...}))`` to save
    plain data with every epoch too (``d2lft finetune`` saves its settings and class names, so a
    checkpoint written before a crash still says what it is).
    """

    def __init__(self, path: str | Path, *, extra: Mapping[str, Any] | None = None, callbacks: Iterable[Any] = (),
                 best: EarlyStopping | None = None) -> None:
        self.path = Path(path)
        self.extra = dict(extra) if extra is not None else None
        self.callbacks = list(callbacks)
        self.best = best

    def on_epoch_end(self, run: Run) -> None:
        current = self.best is None or self.best.best_epoch == len(run.history)
        save_checkpoint(self.path, net=run.net, optimizer=run.optimizer, scheduler=run.scheduler,
                        history=run.history, epoch=len(run.history), callbacks=self.callbacks,
                        generators=run.generators, best_model=None if current else self.best.best_state,
                        extra=self.extra)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


class ProgressBar:
    """A tqdm bar per epoch: the loss about once a second, the epoch's numbers at its end.

    Shown in notebooks and on terminals (not in logs), on the main process only.
    """

    def __init__(self, *, check_seconds: float = 1.0) -> None:
        self.bar = None
        self.check_seconds = check_seconds
        self._next = 0.0

    def on_epoch_start(self, run: Run) -> None:
        from tqdm.auto import tqdm

        disable = not distributed.is_main_process() or (None if not _in_notebook() else False)
        self.bar = tqdm(total=run.batches, disable=disable, desc=f"epoch {run.epoch + 1}/{run.epochs}",
                        unit="batch", dynamic_ncols=True)
        self._next = time.perf_counter() + self.check_seconds

    def on_batch_end(self, run: Run) -> None:
        if self.bar is None or self.bar.disable:
            return
        self.bar.update()
        if time.perf_counter() > self._next:  # reading the loss waits for the device: about once a second
            self.bar.set_postfix(loss=f"{run.loss.item():.4f}")
            self._next = time.perf_counter() + self.check_seconds

    def on_epoch_end(self, run: Run) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix(run.history.summary(), refresh=True)
        self._close()

    def on_fit_end(self, run: Run) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
