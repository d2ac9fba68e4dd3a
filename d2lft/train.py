"""`fit`: the training loop a learner writes by hand, only complete; and `evaluate`, `predict`.

One epoch of `fit` is the loop from chapter 1::

    net.train()
    for x, y in train_loader:
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()            # once per batch

and around it `fit` adds what a real run needs: validation and metrics every epoch (a `History`),
mixed precision and channels-last (`d2lft.loop.Runner`), the best weights kept and early stopping,
checkpoints a run can resume from exactly, a progress bar, and clean stops on a non-finite loss
or Ctrl-C. Those extras are callbacks (`d2lft.callbacks`); the loop itself stays short. Metrics
stay on the device during an epoch and are read once at its end, so `fit` runs as fast as the
plain loop.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from d2lft import distributed
from d2lft.callbacks import (MONITORS, Checkpoint, EarlyStopping, ProgressBar, Run, StopReason, call,
                             check_callbacks)
from d2lft.checkpoint import _loader_generators, _set_rng_state, load_checkpoint
from d2lft.device import set_seed
from d2lft.errors import ConfigError
from d2lft.freeze import set_train_mode
from d2lft.loop import Runner, eval_outputs, train_step
from d2lft.metrics import batch_score, check_task, loss_for, metric_name
from d2lft.optim import make_optimizer, make_scheduler, param_groups

__all__ = ["History", "fit", "evaluate", "predict"]

_CHECK_SECONDS = 1.0  # how often a running epoch looks for a non-finite loss (one host sync)


@dataclass
class History:
    """What `fit` measured, one list entry per epoch (plain data: ``to_dict()`` is JSON-ready).

    ``epoch`` counts from 1; ``best_epoch`` is the epoch whose weights `fit` kept. Metrics that
    do not apply are None (accuracy for regression, MAE for classification, all validation
    metrics without a validation loader). ``lr`` is the first parameter group's rate at the start
    of the epoch. ``stop_reason`` is a `d2lft.callbacks.StopReason` value when a run ended before
    its last epoch (``stop_message`` says it in words).

    >>> h = History(epoch=[1], train_loss=[0.5], val_loss=[0.4], val_acc=[0.9])
    >>> len(h), h.to_dict()["val_acc"]
    (1, [0.9])
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float | None] = field(default_factory=list)
    train_mae: list[float | None] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)
    val_acc: list[float | None] = field(default_factory=list)
    val_mae: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    images_per_second: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_value: float | None = None
    stop_reason: str | None = None
    stop_message: str | None = None
    probe_epochs: int = 0  # the first epochs trained only a head on cached features (probe, lp-ft)
    kept: str | None = None  # which phase fine_tune handed back: "probe", "finetune" (lp-ft), or the strategy
    # fine_tune's strategy "auto": the images' distance from the pretraining data (features.domain_shift),
    # the images its choices were made on, and its decision in words
    domain_shift: float | None = None
    selected_on: str | None = None
    decision: str | None = None
    # "auto" when it fine-tunes: the test-time augmentation the run chose where it chose the epoch (None:
    # the plain net validated better); predict as it validated with ``ft.TTA(net, **history.tta)``
    tta: dict[str, bool] | None = None

    def __len__(self) -> int:
        return len(self.epoch)

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == StopReason.EARLY_STOPPING

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == StopReason.INTERRUPTED

    @property
    def halted(self) -> bool:
        """True when the run ended for a reason other than its epochs or early stopping (Ctrl-C, a NaN loss)."""
        return self.stop_reason in (StopReason.INTERRUPTED, StopReason.NON_FINITE_LOSS)

    def to_dict(self) -> dict[str, Any]:
        """A dict of plain lists and numbers (for JSON, checkpoints and `d2lft.plot.plot_history`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """The inverse of `to_dict` (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in data.items() if k in names})

    def append(self, *, train: dict[str, float], val: dict[str, float] | None, lr: float, seconds: float) -> None:
        """Record one epoch: the train and validation sums of `_sums`, the epoch's lr and duration."""
        self.epoch.append(len(self.epoch) + 1)
        for split, sums in (("train", train), ("val", val)):
            for name in ("loss", "acc", "mae"):
                getattr(self, f"{split}_{name}").append(sums.get(name) if sums else None)
        self.lr.append(lr)
        self.seconds.append(seconds)
        self.images_per_second.append(train["count"] / train["seconds"] if train["seconds"] > 0 else math.nan)

    def summary(self) -> dict[str, str]:
        """The last epoch's numbers, formatted (for a progress bar)."""
        shown = {}
        for name in ("train_loss", "train_acc", "train_mae", "val_loss", "val_acc", "val_mae"):
            value = getattr(self, name)[-1]
            if value is not None:
                shown[name] = f"{value:.4f}"
        shown["img/s"] = f"{self.images_per_second[-1]:.0f}"
        return shown


# ----------------------------------------------------------------------------- evaluation


def _sums(loss_sum: torch.Tensor, score_sum: torch.Tensor, count: int, task: str) -> dict[str, float]:
    """Mean loss and metric from sums on the device; under torchrun, over all processes (one host sync)."""
    totals = torch.stack([loss_sum.float(), score_sum.float(), torch.tensor(float(count), device=loss_sum.device)])
    loss_total, score_total, n = distributed.all_reduce_sum(totals).tolist()
    if n == 0:
        raise ConfigError("the loader yielded no batches; check the dataset (is the folder empty?)")
    return {"loss": loss_total / n, metric_name(task): score_total / n, "count": int(n)}


@torch.no_grad()
def _evaluate(net: nn.Module, loader: Iterable, *, runner: Runner, task: str, loss_fn: nn.Module) -> dict[str, float]:
    loss_sum = torch.zeros((), device=runner.device)
    score_sum = torch.zeros((), device=runner.device)
    count = 0
    for out, y in eval_outputs(net, loader, runner=runner):
        y = y if task == "classification" else y.float().reshape(out.shape)
        loss_sum += loss_fn(out, y).float() * len(y)
        score_sum += batch_score(out, y, task)
        count += len(y)
    return _sums(loss_sum, score_sum, count, task)


def evaluate(net: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
             task: str = "classification", loss_fn: nn.Module | None = None) -> dict[str, float]:
    """Mean loss and accuracy (classification) or MAE (regression) of `net` on `loader`.

    Runs in eval mode without gradients, on `device` (default: where the net's weights are), and
    puts every layer back in the mode it was in.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = DataLoader(TensorDataset(torch.eye(2), torch.tensor([0, 1])), batch_size=2)
    >>> net = nn.Linear(2, 2, bias=False); net.weight.data = torch.eye(2)
    >>> evaluate(net, data)["acc"]
    1.0
    """
    check_task(task, where="evaluate")
    runner = Runner.for_net(net, device)
    net.to(runner.device)
    return _evaluate(net, loader, runner=runner, task=task, loss_fn=loss_fn or loss_for(task))


@torch.no_grad()
def predict(net: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
            task: str | None = None, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, targets)`` for everything in `loader`, on the CPU.

    Outputs are class probabilities (softmax) for classification, raw values for regression;
    `task` None means classification when the net has more than one output. ``logits=True``
    returns the raw outputs of a classifier too (what `d2lft.calibration.fit_temperature` fits).
    Targets are empty when the loader yields images only. Eval mode, no gradients; layer modes
    are restored.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = DataLoader(TensorDataset(torch.zeros(3, 4), torch.tensor([0, 1, 1])), batch_size=2)
    >>> probs, targets = predict(nn.Linear(4, 2), data)
    >>> probs.shape, probs.sum(1), targets.tolist()
    (torch.Size([3, 2]), tensor([1., 1., 1.]), [0, 1, 1])
    """
    runner = Runner.for_net(net, device)
    net.to(runner.device)
    outputs, targets = [], []
    for out, y in eval_outputs(net, loader, runner=runner):
        out = out.float()
        classify = task == "classification" or (task is None and out.ndim == 2 and out.shape[1] > 1)
        outputs.append((out.softmax(1) if classify and not logits else out).cpu())
        if y is not None:
            targets.append(y.cpu())
    if not outputs:
        raise ConfigError("predict: the loader yielded no batches; check the dataset")
    return torch.cat(outputs), (torch.cat(targets) if targets else torch.empty(0))


# ----------------------------------------------------------------------------- fit


def _check_loader(name: str, loader: Any) -> None:
    if not isinstance(loader, Iterable):
        raise TypeError(f"fit: {name} must be an iterable of (inputs, targets) batches such as a DataLoader, "
                        f"got {type(loader).__name__}")
    if hasattr(loader, "__len__") and len(loader) == 0:
        raise ConfigError(f"fit: {name} is empty (0 batches); check its dataset (an empty folder?) and batch_size")


def _check_fit_args(net, train_loader, val_loader, *, epochs, optimizer, lr, weight_decay, scheduler, task,
                    best, early_stopping, seed) -> None:
    """Fail before training starts, naming the argument, its value and what is expected."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"fit: net must be a torch.nn.Module, got {type(net).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"fit: epochs must be an int >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ConfigError(f"fit: lr must be a positive finite number such as 1e-3, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ConfigError(f"fit: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    check_task(task, where="fit")
    if best is not None and best not in MONITORS:
        raise ConfigError(f"fit: best={best!r} is not one of {list(MONITORS)} (or None: keep the last epoch)")
    if (best == "val_acc" and task == "regression") or (best == "val_mae" and task == "classification"):
        raise ConfigError(f"fit: best={best!r} does not exist for task={task!r}; use 'val_loss' or "
                          f"{'val_mae' if task == 'regression' else 'val_acc'}")
    if early_stopping is not None and (val_loader is None or best is None):
        raise ConfigError(f"fit: early_stopping={early_stopping!r} needs a val_loader and best='val_loss' (or "
                          "val_acc/val_mae) to watch")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fit: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scheduler is not None and not isinstance(scheduler, (str, LRScheduler, ReduceLROnPlateau)):
        raise TypeError(f"fit: scheduler must be None, a name for d2lft.make_scheduler or a torch LR scheduler, "
                        f"got {type(scheduler).__name__}")
    if isinstance(scheduler, str) and not hasattr(train_loader, "__len__"):
        raise ConfigError(f"fit: scheduler={scheduler!r} needs len(train_loader) (batches per epoch); pass a "
                          "DataLoader or build the scheduler yourself")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"fit: seed must be None or an int, got {seed!r}")
    _check_loader("train_loader", train_loader)
    if val_loader is not None:
        _check_loader("val_loader", val_loader)


def _check_preprocessing(net: nn.Module, *loaders: Any) -> None:
    """Refuse images prepared for other weights (a `Net` knows its preprocessing; the datasets of
    `d2lft.image_folders` know theirs)."""
    own = getattr(net, "preprocessing", None)
    for loader in loaders:
        theirs = getattr(getattr(loader, "dataset", None), "preprocessing", None)
        if own is not None and theirs is not None and not own.same_normalization(theirs):
            raise ConfigError(
                f"fit: the images are normalised with mean {theirs.mean} and std {theirs.std}, but "
                f"{getattr(net, 'name', 'the model')!r} expects mean {own.mean} and std {own.std}; build the "
                "data from the model: ft.image_folders(root, net)")


def _train_epoch(model: nn.Module, loader: Iterable, *, run: Run, runner: Runner, loss_fn, task: str, scaler,
                 callbacks: list) -> dict[str, float] | None:
    """One pass over `loader`; the sums of its losses and scores, or None when the run must stop."""
    scheduler = run.scheduler if not isinstance(run.scheduler, ReduceLROnPlateau) else None
    start = time.perf_counter()
    losses: list[torch.Tensor] = []  # 0-d tensors: reading each with .item() would stall the GPU every step
    sizes: list[int] = []
    scores: list[torch.Tensor] = []
    checked, next_check = 0, start + _CHECK_SECONDS
    for batch in loader:
        out, y, loss = train_step(model, batch, runner=runner, optimizer=run.optimizer, loss_fn=loss_fn, task=task,
                                  scaler=scaler, scheduler=scheduler)
        losses.append(loss.detach())
        sizes.append(len(y))
        scores.append(batch_score(out, y, task))
        run.loss = losses[-1]
        call(callbacks, "on_batch_end", run)
        if run.stop is not None:
            return None
        if time.perf_counter() > next_check and not distributed.is_distributed():  # about once a second
            if _first_bad(losses, checked, run):
                return None
            checked, next_check = len(losses), time.perf_counter() + _CHECK_SECONDS
    if not losses:
        raise ConfigError("fit: the train_loader yielded no batches; check its dataset and batch_size")
    weights = torch.tensor(sizes, device=runner.device, dtype=torch.float32)
    loss_sum = (torch.stack(losses).float() * weights).sum()
    sums = _sums(loss_sum, torch.stack(scores).float().sum(), int(weights.sum().item()), task)
    if not math.isfinite(sums["loss"]):  # here or, under torchrun, on another process
        _first_bad(losses, checked, run)
        run.stop = StopReason.NON_FINITE_LOSS
        run.stop_message = run.stop_message or f"non-finite loss at epoch {run.epoch + 1}"
        return None
    sums["seconds"] = time.perf_counter() - start
    return sums


def _first_bad(losses: list[torch.Tensor], start: int, run: Run) -> bool:
    """Stop the run at the first non-finite loss from `start` on (one host sync); True if there was one."""
    if start >= len(losses):
        return False
    finite = torch.isfinite(torch.stack(losses[start:]).float())
    if bool(finite.all()):
        return False
    step = start + int((~finite).nonzero()[0, 0]) + 1
    run.stop = StopReason.NON_FINITE_LOSS
    run.stop_message = f"non-finite loss at epoch {run.epoch + 1} step {step}"
    return True


def _resume(path: str | Path, run: Run, callbacks: list) -> int:
    """Load a checkpoint of `fit` into the run; returns the number of epochs it already holds."""
    saved = load_checkpoint(path, run.net, optimizer=run.optimizer, scheduler=run.scheduler,
                            callbacks=[cb for cb in callbacks if hasattr(cb, "state_dict")])
    run.history = History.from_dict(saved.get("history") or {})
    if saved.get("rng"):
        _set_rng_state(saved["rng"], run.generators)
    for cb in callbacks:  # the best weights so far come back too
        if isinstance(cb, EarlyStopping) and cb.restore_best:
            best = saved.get("best_model")
            cb.best_state = dict(best) if best else {k: v.detach().cpu().clone() for k, v in run.net.state_dict().items()}
    return int(saved.get("epoch") or 0)


def fit(
    net: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    scheduler: str | LRScheduler | None = None,
    loss_fn: nn.Module | None = None,
    task: str = "classification",
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool | None = None,
    best: str | None = "val_loss",
    early_stopping: int | None = None,
    checkpoint: str | Path | Checkpoint | None = None,
    resume: str | Path | None = None,
    callbacks: Iterable[Any] = (),
    progress: bool = True,
    seed: int | None = None,
) -> History:
    """Train `net` for `epochs` epochs on `train_loader`, validating on `val_loader`; returns a `History`.

    Works on any ``nn.Module`` (a `Net`, its ``head`` on cached features ...). Defaults:

    * `optimizer`: AdamW over ``d2lft.param_groups(net, lr=lr, weight_decay=weight_decay)`` (for a
      `Net` the head learns 10x faster). `scheduler`: a name for ``d2lft.make_scheduler`` or a
      torch scheduler, stepped after every batch (``ReduceLROnPlateau``: after every epoch).
    * `loss_fn`: cross-entropy (classification) or MSE (regression; targets become floats shaped
      like the outputs and the history records the MAE).
    * `device`: `d2lft.get_device()`; the net moves there and stays. `amp` and `channels_last`:
      see `d2lft.loop.Runner` (mixed precision on CUDA, channels-last on CUDA and the CPU).
    * `best` (``"val_loss"``, ``"val_acc"``, ``"val_mae"``, or None for the last epoch) picks the
      epoch whose weights are kept: they are put back at the end, also after an early stop
      (`early_stopping` = epochs without improvement), a non-finite loss or Ctrl-C.
    * A non-finite loss stops the run with a warning naming the epoch and the step (checked about
      once a second, so the GPU never waits); Ctrl-C stops it cleanly. Both return the `History`
      with ``stop_reason`` set instead of raising.
    * `checkpoint`: saved after every epoch (a path, or ``d2lft.callbacks.Checkpoint(path, extra=...)``
      to save plain data with it); `resume`: continue such a run where it stopped (`epochs` counts
      the epochs of the whole run). `seed`: `d2lft.set_seed` first, and the shuffling of
      `train_loader` starts again from it, so the same call on the same data trains the same again.
    * `callbacks`: see `d2lft.callbacks` (e.g. `d2lft.GradualUnfreezing`, ``d2lft.plot.LivePlot``).

    Under torchrun, call ``d2lft.distributed.setup(device)`` first; `fit` then trains with
    DistributedDataParallel on each process's share of the data.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
    >>> data = DataLoader(TensorDataset(x, y), batch_size=16)
    >>> history = fit(nn.Linear(2, 2), data, data, epochs=3, lr=0.1, progress=False, seed=0)
    >>> len(history), history.val_acc[-1] > 0.8
    (3, True)
    """
    _check_fit_args(net, train_loader, val_loader, epochs=epochs, optimizer=optimizer, lr=lr,
                    weight_decay=weight_decay, scheduler=scheduler, task=task, best=best,
                    early_stopping=early_stopping, seed=seed)
    _check_preprocessing(net, train_loader, val_loader)
    user_callbacks = check_callbacks(callbacks)
    if seed is not None:
        set_seed(seed)
        for generator in _loader_generators(train_loader):  # the same order as the last call with this seed
            generator.manual_seed(seed)
    runner = Runner.for_device(device, amp=amp, channels_last=channels_last)
    distributed.check_setup(runner.device)
    train_loader = distributed.shard_loader(train_loader, seed=seed or 0)  # torchrun: each process its share
    runner.prepare(net)
    if optimizer is None:
        optimizer = make_optimizer(param_groups(net, lr=lr, weight_decay=weight_decay), "adamw")
    if isinstance(scheduler, str):
        scheduler = make_scheduler(optimizer, scheduler, epochs=epochs, steps_per_epoch=len(train_loader))
    loss_fn = loss_fn if loss_fn is not None else loss_for(task)
    scaler = runner.grad_scaler()

    monitor = best if val_loader is not None else None
    tracker = EarlyStopping(early_stopping, monitor=monitor, restore_best=best is not None)
    stateful = [tracker, *user_callbacks]
    callbacks = [tracker, *user_callbacks]
    if checkpoint is not None:
        path, extra = (checkpoint.path, checkpoint.extra) if isinstance(checkpoint, Checkpoint) else (checkpoint, None)
        callbacks.append(Checkpoint(path, extra=extra, callbacks=[cb for cb in stateful if hasattr(cb, "state_dict")],
                                    best=tracker))
    if progress:
        callbacks.append(ProgressBar())
    run = Run(net=net, optimizer=optimizer, scheduler=scheduler, history=History(), epochs=epochs,
              batches=len(train_loader) if hasattr(train_loader, "__len__") else None,
              generators=_loader_generators(train_loader))
    start = _resume(resume, run, stateful) if resume is not None else 0
    if start >= epochs or run.history.stopped_early:
        warnings.warn(f"fit: {resume} already holds {start} epoch(s); nothing to train for epochs={epochs}",
                      RuntimeWarning, stacklevel=2)
        start = epochs

    try:
        for epoch in range(start, epochs):
            run.epoch = epoch
            call(callbacks, "on_epoch_start", run)
            set_train_mode(net, True)  # like net.train(), but frozen BatchNorm layers keep their statistics
            # torchrun: DDP averages the gradients of the parameters that train when it is made (a
            # callback may just have unfrozen some), so wrap each epoch. One process: model is net.
            model = distributed.wrap(net, runner.device)
            distributed.set_epoch(train_loader, epoch)
            epoch_lr = float(optimizer.param_groups[0]["lr"])
            tic = time.perf_counter()
            train = _train_epoch(model, train_loader, run=run, runner=runner, loss_fn=loss_fn, task=task,
                                 scaler=scaler, callbacks=callbacks)
            if train is None:
                break
            val = _evaluate(net, val_loader, runner=runner, task=task, loss_fn=loss_fn) if val_loader else None
            run.history.append(train=train, val=val, lr=epoch_lr, seconds=time.perf_counter() - tic)
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(getattr(run.history, monitor or "train_loss")[-1])
            call(callbacks, "on_epoch_end", run)
            if run.stop is not None:
                break
    except KeyboardInterrupt:
        run.stop, run.stop_message = StopReason.INTERRUPTED, f"interrupted (Ctrl-C) during epoch {run.epoch + 1}"
    finally:
        if runner.channels_last:
            net.to(memory_format=torch.contiguous_format)  # leave the caller's model as it came
    if run.stop is not None:
        run.history.stop_reason, run.history.stop_message = run.stop.value, run.stop_message
    if run.stop in (StopReason.NON_FINITE_LOSS, StopReason.INTERRUPTED):
        warnings.warn(f"fit: {run.stop_message}; stopped after {len(run.history)} finished epoch(s)"
                      + (" and kept the best weights so far" if best is not None else "")
                      + (". Try a lower lr (or amp=False)." if run.stop == StopReason.NON_FINITE_LOSS else ""),
                      RuntimeWarning, stacklevel=2)
    call(callbacks, "on_fit_end", run)
    return run.history
