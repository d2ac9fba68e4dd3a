"""`fit`: the training loop a learner writes by hand, only complete.

One epoch of `fit` is the loop from chapter 1::

    net.train()
    for x, y in train_loader:
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()            # once per batch

and around it `fit` adds what a real run needs: validation and metrics every epoch (a `History`),
mixed precision and channels-last on CUDA, early stopping with the best weights restored,
checkpoints a run can resume from exactly, a progress bar, and clean stops on a non-finite
loss or Ctrl-C. Metrics stay on the device during an epoch and are read once at its end (about
once a second for the progress bar), so `fit` runs as fast as the plain loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from tqdm.auto import tqdm

from d2lft import distributed
from d2lft.cpu import keep_freed_memory
from d2lft.freeze import set_train_mode
from d2lft.net import Net

__all__ = [
    "History",
    "EarlyStopping",
    "CheckpointError",
    "fit",
    "evaluate",
    "predict",
    "save_checkpoint",
    "load_checkpoint",
    "get_device",
    "set_seed",
]

TASKS = ("classification", "regression")
MONITORS = {"val_loss": "min", "val_acc": "max", "val_mae": "min"}
CHECKPOINT_FORMAT = "d2lft-checkpoint-v1"
_CHECK_SECONDS = 1.0  # how often a running epoch reads its loss from the device (progress bar, NaN check)


# ----------------------------------------------------------------------------- device and seeds


def get_device() -> torch.device:
    """The fastest device here: CUDA if available, else Apple's MPS, else the CPU (never None).

    >>> get_device().type in ("cuda", "mps", "cpu")
    True
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) random number generators.

    >>> set_seed(0); a = torch.rand(2); set_seed(0)
    >>> torch.equal(a, torch.rand(2))
    True
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"set_seed: seed must be an int, got {seed!r}")
    random.seed(int(seed))
    np.random.seed(int(seed) % 2**32)
    torch.manual_seed(int(seed))  # also seeds every CUDA device


# ----------------------------------------------------------------------------- history and early stopping


@dataclass
class History:
    """What `fit` measured, one list entry per epoch (plain data: ``to_dict()`` is JSON-ready).

    ``epoch`` counts from 1; ``best_epoch`` is the epoch whose weights `fit` restored (or kept).
    Metrics that do not apply are None (accuracy for regression, MAE for classification, all
    validation metrics without a validation loader). ``lr`` is the first parameter group's rate
    at the start of the epoch. ``stop_reason`` says why a run ended before its last epoch.

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
    stopped_early: bool = False
    interrupted: bool = False
    stop_reason: str | None = None

    def __len__(self) -> int:
        return len(self.epoch)

    def to_dict(self) -> dict[str, Any]:
        """A dict of plain lists and numbers (for JSON, checkpoints and `d2lft.plot_history`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """The inverse of `to_dict` (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in data.items() if k in names})


class EarlyStopping:
    """Remember the best value of a metric and count the epochs since it last improved.

    `mode` is ``"min"`` for losses, ``"max"`` for accuracies; `patience` None never stops.

    >>> stopper = EarlyStopping(patience=2, mode="min")
    >>> [stopper.update(v, epoch=e) for e, v in enumerate([0.9, 0.7, 0.8, 0.75], start=1)]
    [True, True, False, False]
    >>> stopper.should_stop, stopper.best_epoch, stopper.best_value
    (True, 2, 0.7)
    """

    def __init__(self, patience: int | None = None, *, mode: str = "min") -> None:
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"early_stopping: patience must be None or an int >= 1 (epochs), got {patience!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.mode = mode
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, value: float, *, epoch: int) -> bool:
        """Record `value` for `epoch`; True when it is a new best (strictly better)."""
        better = self.best_value is None or (
            value < self.best_value if self.mode == "min" else value > self.best_value
        )
        if better and not math.isnan(value):
            self.best_value, self.best_epoch, self.bad_epochs = float(value), int(epoch), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "mode": self.mode, "best_value": self.best_value,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model; the message says which and why."""


def _rng_state(generators: Sequence[torch.Generator]) -> dict[str, Any]:
    """Every random number generator a run draws from, as tensors and lists (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": [g.get_state() for g in generators],
    }


def _set_rng_state(state: Mapping[str, Any], generators: Sequence[torch.Generator]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch.Generator objects that shuffle `loader` (saved so a resumed run shuffles the same)."""
    found: dict[int, torch.Generator] = {}
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def _model_info(net: nn.Module) -> dict[str, Any]:
    info: dict[str, Any] = {"class": type(net).__name__}
    if isinstance(net, Net):
        info.update(name=net.name, num_outputs=net.num_outputs)
    return info


def _describe(info: Mapping[str, Any]) -> str:
    text = f"{info.get('class', '?')} {info['name']!r}" if info.get("name") else str(info.get("class", "?"))
    return text + (f" with {info['num_outputs']} outputs" if info.get("num_outputs") is not None else "")


def save_checkpoint(
    path: str | Path,
    *,
    net: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    history: History | None = None,
    epoch: int | None = None,
    callbacks: Iterable[Any] = (),
    extra: Mapping[str, Any] | None = None,
    best_model: Mapping[str, torch.Tensor] | None = None,
    early_stopping: EarlyStopping | None = None,
    generators: Sequence[torch.Generator] = (),
) -> Path:
    """Write the weights (and whatever a run needs to resume) to `path`, atomically.

    The file is written next to `path` under a temporary name and renamed over it only when
    complete, so an interrupted save never leaves a half-written checkpoint. It holds the random
    number generator states (Python, NumPy, torch, CUDA and `generators`), the state of each
    callback that has ``state_dict()``, and `extra` (plain data, e.g. class names). `epoch` is the
    number of epochs done. Read it back with `load_checkpoint` (``weights_only=True``). Under
    torchrun only the main process writes (all processes hold the same weights).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "run.pt"
    >>> save_checkpoint(path, net=nn.Linear(2, 1), extra={"classes": ["a", "b"]}).name
    'run.pt'
    """
    path = Path(path)
    if not distributed.is_main_process():
        return path
    stateful = [cb for cb in callbacks if hasattr(cb, "state_dict")]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_info": _model_info(net),
        "model": net.state_dict(),
        "best_model": dict(best_model) if best_model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": history.to_dict() if history is not None else None,
        "epoch": epoch,
        "callbacks": [{"class": type(cb).__name__, "state": cb.state_dict()} for cb in stateful],
        "early_stopping": early_stopping.state_dict() if early_stopping is not None else None,
        "rng": _rng_state(generators),
        "extra": dict(extra) if extra is not None else {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _short(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_weights(path: Path, net: nn.Module, state: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """`net.load_state_dict(state)`, or one CheckpointError listing every key and shape that differs."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{path}: the checkpoint does not fit this model ({_describe(_model_info(net))}); "
                 f"it was saved from {_describe(info)}."]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): {_short(items)}")
        hint = (f"ft.create_model({info['name']!r}, num_classes={info['num_outputs']})"
                if info.get("name") and info.get("num_outputs") else "the same architecture")
        lines.append(f"Create the model it was saved from first ({hint}), then load it.")
        raise CheckpointError("\n".join(lines))
    net.load_state_dict(state)


def load_checkpoint(
    path: str | Path,
    net: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    callbacks: Iterable[Any] = (),
    best: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint into `net` (and `optimizer`, `scheduler`, `callbacks`); returns its contents.

    `best=True` loads the best weights a `fit` run saw instead of its last epoch's (they are the
    same when the last epoch was the best). A plain ``torch.save(net.state_dict())`` file loads
    too. Any problem (no file, truncated file, not a checkpoint, another architecture or number
    of classes) raises one `CheckpointError` naming the file and what differs.

    >>> import tempfile
    >>> path = save_checkpoint(Path(tempfile.mkdtemp()) / "run.pt", net=nn.Linear(2, 1), epoch=3)
    >>> load_checkpoint(path, nn.Linear(2, 1))["epoch"]
    3
    >>> load_checkpoint(path, nn.Linear(5, 1))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    d2lft.train.CheckpointError: ...run.pt: the checkpoint does not fit this model (Linear); ...
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path (fit(checkpoint=...) writes one)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects weights_only refuses ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(
            f"{path}: cannot read it as a PyTorch checkpoint ({type(e).__name__}: {reason}). The file may be "
            "truncated (an interrupted copy) or not a checkpoint; save it again with d2lft.save_checkpoint."
        ) from None
    if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        data = {"format": "state_dict", "model_info": {"class": "?"}, "model": dict(data)}  # a bare state_dict
    if not isinstance(data, Mapping) or "model" not in data:
        keys = sorted(map(str, data))[:10] if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(f"{path}: not a d2lft checkpoint (found {keys}); expected a file written by "
                              "d2lft.save_checkpoint or torch.save(net.state_dict(), path)")
    info = data.get("model_info") or {}
    weights = data["model"] if not best or data.get("best_model") is None else data["best_model"]
    _load_weights(path, net, weights, info)
    try:
        if optimizer is not None and data.get("optimizer") is not None:
            optimizer.load_state_dict(data["optimizer"])
        if scheduler is not None and data.get("scheduler") is not None:
            scheduler.load_state_dict(data["scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the optimizer or scheduler state does not fit ({e}); build them the way "
                              "the checkpointed run did (same parameter groups, same schedule)") from None
    stateful = [cb for cb in callbacks if hasattr(cb, "load_state_dict")]
    if stateful:
        saved = list(data.get("callbacks") or [])
        names = [type(cb).__name__ for cb in stateful]
        if [s["class"] for s in saved] != names:
            raise CheckpointError(f"{path}: the checkpoint holds state for callbacks {[s['class'] for s in saved]}, "
                                  f"but got {names}; pass the same callbacks as the checkpointed run")
        for cb, s in zip(stateful, saved):
            cb.load_state_dict(s["state"])
    return dict(data)


# ----------------------------------------------------------------------------- one pass over the data


def _amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """The autocast dtype: bf16 where supported (no loss scaling needed), else fp16; None = float32."""
    if amp is None:
        amp = device.type == "cuda"  # on the CPU autocast is slower for convolutions
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _batch(batch: Any, device: torch.device, *, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y)`` on `device` from a batch ``(x, y, ...)`` or a bare ``x``."""
    x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (list, tuple)) else (batch, None)
    if channels_last and x.ndim == 4:
        x = x.to(device, memory_format=torch.channels_last, non_blocking=True)
    else:
        x = x.to(device, non_blocking=True)
    return x, (y.to(device, non_blocking=True) if y is not None else None)


def _target(y: torch.Tensor, out: torch.Tensor, task: str) -> torch.Tensor:
    """Regression targets become floats shaped like the outputs ((B,) -> (B, 1))."""
    if y is None:
        raise ValueError("the loader yields inputs only; training and evaluation need (inputs, targets) batches")
    return y.float().reshape(out.shape) if task == "regression" else y


def _module_modes(net: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in net.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _net_device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else get_device()


def _forward(net: nn.Module, batch, *, device: torch.device, task: str, loss_fn: nn.Module,
             amp_dtype: torch.dtype | None, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs, targets (shaped for the loss) and loss of one batch: the step a training loop repeats."""
    x, y = _batch(batch, device, channels_last=channels_last)
    with _autocast(device, amp_dtype):
        out = net(x)
        y = _target(y, out, task)
        loss = loss_fn(out, y)
    return out, y, loss


def _hits(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Correct predictions (classification) or the summed absolute error (regression), on the device."""
    return (out.argmax(1) == y).sum() if task == "classification" else (out.detach().float() - y).abs().sum()


@torch.no_grad()
def _eval_sums(net: nn.Module, loader: Iterable, *, device: torch.device, task: str, loss_fn: nn.Module,
               amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict[str, float]:
    """Loss, accuracy or MAE over `loader`, summed on the device and read once."""
    loader = distributed.shard_eval_loader(loader)  # torchrun: each process evaluates its share, no duplicates
    loss_sum = torch.zeros((), device=device)
    hits = torch.zeros((), device=device)
    count = 0
    for batch in loader:
        out, y, loss = _forward(net, batch, device=device, task=task, loss_fn=loss_fn, amp_dtype=amp_dtype,
                                channels_last=channels_last)
        loss_sum += loss.float() * len(y)
        hits += _hits(out, y, task)
        count += len(y)
    # torchrun: add up the sums and counts of all processes, so every one reports the whole set's metrics.
    sums = torch.stack([loss_sum, hits, torch.tensor(float(count), device=device)])
    loss_total, hit_total, count = distributed.all_reduce_sum(sums).tolist()  # the only host sync
    if count == 0:
        raise ValueError("evaluate: the loader yielded no batches; check the dataset (is the folder empty?)")
    metric = "acc" if task == "classification" else "mae"
    return {"loss": loss_total / count, metric: hit_total / count, "count": int(count)}


def _default_loss(task: str) -> nn.Module:
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def evaluate(net: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
             task: str = "classification", loss_fn: nn.Module | None = None, amp: bool = False) -> dict[str, float]:
    """Mean loss and accuracy (classification) or MAE (regression) of `net` on `loader`.

    Runs in eval mode without gradients, on `device` (default: where the net's weights are), and
    puts every layer back in the mode it was in.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = DataLoader(TensorDataset(torch.eye(2), torch.tensor([0, 1])), batch_size=2)
    >>> net = nn.Linear(2, 2, bias=False); net.weight.data = torch.eye(2)
    >>> evaluate(net, data)["acc"]
    1.0
    """
    _check_choice("task", task, TASKS, where="evaluate")
    device = torch.device(device) if device is not None else _net_device(net)
    modes = _module_modes(net)
    net.to(device).eval()
    try:
        return _eval_sums(net, loader, device=device, task=task, loss_fn=loss_fn or _default_loss(task),
                          amp_dtype=_amp_dtype(device, amp))
    finally:
        _restore_modes(modes)


@torch.no_grad()
def predict(net: nn.Module, loader: Iterable, *, device: str | torch.device | None = None,
            task: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs, targets)`` for everything in `loader`, on the CPU.

    Outputs are class probabilities (softmax) for classification, raw values for regression;
    `task` None means classification when the net has more than one output. Targets are empty
    when the loader yields images only. Eval mode, no gradients; layer modes are restored.

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> data = DataLoader(TensorDataset(torch.zeros(3, 4), torch.tensor([0, 1, 1])), batch_size=2)
    >>> probs, targets = predict(nn.Linear(4, 2), data)
    >>> probs.shape, probs.sum(1), targets.tolist()
    (torch.Size([3, 2]), tensor([1., 1., 1.]), [0, 1, 1])
    """
    device = torch.device(device) if device is not None else _net_device(net)
    modes = _module_modes(net)
    net.to(device).eval()
    outputs, targets = [], []
    try:
        for batch in loader:
            x, y = _batch(batch, device, channels_last=False)
            out = net(x).float()
            classify = task == "classification" or (task is None and out.ndim == 2 and out.shape[1] > 1)
            outputs.append((out.softmax(1) if classify else out).cpu())
            if y is not None:
                targets.append(y.cpu())
    finally:
        _restore_modes(modes)
    if not outputs:
        raise ValueError("predict: the loader yielded no batches; check the dataset")
    return torch.cat(outputs), (torch.cat(targets) if targets else torch.empty(0))


# ----------------------------------------------------------------------------- fit


def _check_choice(name: str, value: Any, choices: Sequence[str], *, where: str) -> None:
    if value not in choices:
        raise ValueError(f"{where}: {name}={value!r} is not one of {list(choices)}")


def _check_loader(name: str, loader: Any) -> None:
    if not isinstance(loader, Iterable):
        raise TypeError(f"fit: {name} must be an iterable of (inputs, targets) batches such as a DataLoader, "
                        f"got {type(loader).__name__}")
    if hasattr(loader, "__len__") and len(loader) == 0:
        raise ValueError(f"fit: {name} is empty (0 batches); check its dataset (an empty folder?) and batch_size "
                         "(drop_last=True with fewer samples than one batch gives no batches)")


def _check_fit_args(net, train_loader, val_loader, *, epochs, optimizer, lr, weight_decay, scheduler, task,
                    monitor, early_stopping, callbacks, seed) -> None:
    """Fail before training starts, naming the argument, its value and what is expected."""
    if not isinstance(net, nn.Module):
        raise TypeError(f"fit: net must be a torch.nn.Module, got {type(net).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be an int >= 1, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (0 < lr < math.inf):
        raise ValueError(f"fit: lr must be a positive finite number such as 1e-3, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"fit: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    _check_choice("task", task, TASKS, where="fit")
    _check_choice("monitor", monitor, list(MONITORS), where="fit")
    if (monitor == "val_acc" and task == "regression") or (monitor == "val_mae" and task == "classification"):
        raise ValueError(f"fit: monitor={monitor!r} does not exist for task={task!r}; use 'val_loss' or "
                         f"{'val_mae' if task == 'regression' else 'val_acc'}")
    if early_stopping is not None and val_loader is None:
        raise ValueError(f"fit: early_stopping={early_stopping!r} needs a val_loader to watch {monitor!r}")
    EarlyStopping(early_stopping)  # validates patience
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fit: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scheduler is not None and not isinstance(scheduler, (str, LRScheduler, ReduceLROnPlateau)):
        raise TypeError(f"fit: scheduler must be None, a name for d2lft.make_scheduler or a torch LR scheduler, "
                        f"got {type(scheduler).__name__}")
    if isinstance(scheduler, str) and not hasattr(train_loader, "__len__"):
        raise ValueError(f"fit: scheduler={scheduler!r} needs len(train_loader) (batches per epoch); pass a "
                         "DataLoader or build the scheduler yourself")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"fit: seed must be None or an int, got {seed!r}")
    _check_loader("train_loader", train_loader)
    if val_loader is not None:
        _check_loader("val_loader", val_loader)
    for cb in callbacks:
        if isinstance(cb, type):
            raise TypeError(f"fit: callbacks must be instances; got the class {cb.__name__} (write {cb.__name__}())")
        if not (hasattr(cb, "on_epoch_start") or hasattr(cb, "on_epoch_end")):
            raise TypeError(f"fit: callback {cb!r} has neither on_epoch_start(epoch, net, optimizer) nor "
                            "on_epoch_end(epoch, net, optimizer, history)")


def _default_optimizer(net: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; for a `Net` the head learns 10x faster (d2lft.param_groups), else one rate for all."""
    if isinstance(net, Net):
        from d2lft.optim import param_groups

        return torch.optim.AdamW(param_groups(net, lr=lr, weight_decay=weight_decay))
    params = list(net.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError(f"fit: {type(net).__name__} has no trainable parameters (all frozen); unfreeze some "
                         "(d2lft.unfreeze / d2lft.train_last) or pass another module")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython") and getattr(sys.modules["IPython"], "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def _progress_disabled(progress: bool) -> bool | None:
    """tqdm's `disable`: off when asked, shown in notebooks, else only on a terminal (None = tqdm's TTY check)."""
    if not progress:
        return True
    return False if _in_notebook() else None


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _live_plot(history: History) -> None:
    """Redraw the curves in a notebook (nothing elsewhere, or without IPython/matplotlib)."""
    if not _in_notebook() or not len(history):
        return
    try:
        import matplotlib.pyplot as plt
        from IPython.display import clear_output

        from d2lft.plot import plot_history
    except ImportError:
        return
    clear_output(wait=True)
    plot_history(history)
    plt.show()


@dataclass
class _EpochResult:
    loss: float
    metric: float  # accuracy (classification) or MAE (regression)
    count: int
    seconds: float
    bad_step: int | None  # 1-based step of the first non-finite loss


def _train_epoch(net, loader, *, optimizer, scheduler, loss_fn, task, device, amp_dtype, scaler,
                 channels_last, bar) -> _EpochResult:
    """One pass over `loader`: the hand-written loop, with per-batch sums kept on the device."""
    start = time.perf_counter()
    losses: list[torch.Tensor] = []  # 0-d tensors; reading each with .item() would stall the GPU every step
    sizes: list[int] = []
    hits: list[torch.Tensor] = []
    checked, next_check, bad_step = 0, start + _CHECK_SECONDS, None
    for batch in loader:
        out, y, loss = _forward(net, batch, device=device, task=task, loss_fn=loss_fn, amp_dtype=amp_dtype,
                                channels_last=channels_last)
        optimizer.zero_grad()
        if scaler is not None:  # fp16 only: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
            scheduler.step()
        losses.append(loss.detach())
        sizes.append(len(y))
        hits.append(_hits(out, y, task))
        if time.perf_counter() > next_check:  # about once a second: show the loss, stop on NaN
            bad_step = _first_bad(losses, checked)
            if bad_step is not None and not distributed.is_distributed():  # torchrun: all stop at the epoch's end
                break
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1].item():.4f}")
            checked, next_check = len(losses), time.perf_counter() + _CHECK_SECONDS
        if bar is not None:
            bar.update()
    if bad_step is None and losses:
        bad_step = _first_bad(losses, checked)
    weights = torch.tensor(sizes, device=device, dtype=torch.float32)
    sums = torch.zeros(3, device=device)
    if losses:
        sums = torch.stack([(torch.stack(losses).float() * weights).sum(), torch.stack(hits).float().sum(), weights.sum()])
    # torchrun: add up all processes' sums, so each records the whole epoch (a NaN anywhere stops them all).
    loss_sum, hit_sum, n = distributed.all_reduce_sum(sums).tolist()
    if bad_step is None and not math.isfinite(loss_sum):
        bad_step = len(losses)  # another process saw the non-finite loss
    if not losses or bad_step is not None:
        return _EpochResult(math.nan, math.nan, int(n), time.perf_counter() - start, bad_step)
    return _EpochResult(loss_sum / n, hit_sum / n, int(n), time.perf_counter() - start, None)


def _first_bad(losses: list[torch.Tensor], start: int) -> int | None:
    """1-based index of the first non-finite loss from `start` on (one host sync)."""
    if start >= len(losses):
        return None
    finite = torch.isfinite(torch.stack(losses[start:]).float())
    if bool(finite.all()):
        return None
    return start + int((~finite).nonzero()[0, 0]) + 1


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
    reuse_memory: bool | None = None,
    early_stopping: int | None = None,
    monitor: str = "val_loss",
    restore_best: bool = True,
    checkpoint: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Iterable[Any] | None = (),
    progress: bool = True,
    live_plot: bool = False,
    seed: int | None = None,
) -> History:
    """Train `net` for `epochs` epochs on `train_loader`, validating on `val_loader`; returns a `History`.

    Works on any ``nn.Module`` (a `Net`, its ``head`` on cached features ...). Defaults:

    * `optimizer`: AdamW with `lr` and `weight_decay`; for a `Net`, ``d2lft.param_groups`` (the
      head learns 10x faster). `scheduler`: a name for ``d2lft.make_scheduler`` or a torch
      scheduler, stepped after every batch (``ReduceLROnPlateau``: after every epoch on `monitor`).
    * `loss_fn`: cross-entropy (classification) or MSE (regression; targets become floats shaped
      like the outputs and the history records the MAE).
    * `device`: `get_device()`; the net moves there and stays. `amp`: on for CUDA (bf16 where
      supported, else fp16 with a GradScaler). `channels_last`: on for CUDA and the CPU (training
      steps of a small conv net and of EfficientNet-Lite0 at 160 px ran 1.5x faster on one CPU
      thread); inputs with 4 dimensions are converted too. `reuse_memory`: on for the CPU,
      `d2lft.cpu.keep_freed_memory` (process-wide: glibc keeps freed buffers for the next step
      instead of faulting them in again; Lite0 at 224 px measured 1.11x faster).
    * `monitor` (``"val_loss"``, ``"val_acc"`` or ``"val_mae"``) picks the best epoch; its weights
      are kept on the CPU and, with `restore_best`, put back at the end, also after an early stop
      (`early_stopping` = epochs without improvement), a non-finite loss or Ctrl-C. Without a
      `val_loader` the last completed epoch counts as the best.
    * A non-finite loss stops the run with a warning naming the epoch and the step (the loss is
      checked about once a second, not every step, so the GPU never waits); Ctrl-C stops it
      cleanly. Both return the `History` with ``stop_reason`` set instead of raising.
    * `checkpoint`: saved after every epoch (last and best weights, optimizer, scheduler,
      callbacks, random states); `resume`: continue such a run where it stopped (`epochs` counts
      the epochs of the whole run). `seed`: `set_seed` first, for a reproducible run.
    * `callbacks`: objects with ``on_epoch_start(epoch, net, optimizer)`` and/or
      ``on_epoch_end(epoch, net, optimizer, history)`` (epoch counts from 0), optionally
      ``state_dict()``/``load_state_dict()`` saved in checkpoints (e.g. ``GradualUnfreezing``).

    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> x = torch.randn(64, 2); y = (x[:, 0] > 0).long()
    >>> data = DataLoader(TensorDataset(x, y), batch_size=16)
    >>> history = fit(nn.Linear(2, 2), data, data, epochs=3, lr=0.1, progress=False, seed=0)
    >>> len(history), history.val_acc[-1] > 0.8
    (3, True)
    """
    callbacks = list(callbacks or ())
    _check_fit_args(net, train_loader, val_loader, epochs=epochs, optimizer=optimizer, lr=lr,
                    weight_decay=weight_decay, scheduler=scheduler, task=task, monitor=monitor,
                    early_stopping=early_stopping, callbacks=callbacks, seed=seed)
    device = torch.device(device) if device is not None else get_device()
    device = distributed.setup(device)  # torchrun: join the process group (once); one GPU per process
    train_loader = distributed.shard_loader(train_loader, seed=seed or 0)  # torchrun: each process its share
    if seed is not None:
        set_seed(seed)
    amp_dtype = _amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    channels_last = device.type in ("cuda", "cpu") if channels_last is None else channels_last
    if (device.type == "cpu" if reuse_memory is None else reuse_memory):
        keep_freed_memory()
    net.to(device)
    if channels_last:  # NHWC convolutions: tensor cores on CUDA; on the CPU (oneDNN) measured 1.5x faster
        net.to(memory_format=torch.channels_last)
    optimizer = optimizer if optimizer is not None else _default_optimizer(net, lr=lr, weight_decay=weight_decay)
    if isinstance(scheduler, str):
        from d2lft.optim import make_scheduler

        scheduler = make_scheduler(optimizer, scheduler, epochs=epochs, steps_per_epoch=len(train_loader))
    loss_fn = loss_fn if loss_fn is not None else _default_loss(task)
    monitored = monitor if val_loader is not None else None
    tracker = EarlyStopping(early_stopping, mode=MONITORS[monitor])
    generators = _loader_generators(train_loader)
    history = History()
    best_state = _cpu_copy(net.state_dict()) if restore_best else None  # returned to if the run goes wrong early
    start = 0
    if resume is not None:
        saved = load_checkpoint(resume, net, optimizer=optimizer, scheduler=scheduler, callbacks=callbacks)
        start = int(saved.get("epoch") or 0)
        history = History.from_dict(saved.get("history") or {})
        if saved.get("early_stopping"):
            tracker.load_state_dict(saved["early_stopping"])
        if restore_best:
            best_state = dict(saved["best_model"]) if saved.get("best_model") else _cpu_copy(net.state_dict())
        if saved.get("rng"):
            _set_rng_state(saved["rng"], generators)
        if history.stopped_early or start >= epochs:
            print(f"fit: {resume} already holds {start} epoch(s){' (stopped early)' if history.stopped_early else ''}; "
                  f"nothing to train for epochs={epochs}")
            start = epochs

    disable = _progress_disabled(progress and distributed.is_main_process())  # torchrun: rank 0 shows progress
    epoch = start
    try:
        for epoch in range(start, epochs):
            for cb in callbacks:
                if hasattr(cb, "on_epoch_start"):
                    cb.on_epoch_start(epoch, net, optimizer)
            set_train_mode(net, True)  # like net.train(), but frozen BatchNorm layers keep their statistics
            # torchrun: DistributedDataParallel averages the gradients of the parameters that train when it is
            # made (a callback may just have unfrozen some), so wrap each epoch; one process: model is net.
            model = distributed.wrap(net, device)
            distributed.set_epoch(train_loader, epoch)  # a new shuffle per epoch, the same on every process
            epoch_lr = float(optimizer.param_groups[0]["lr"])
            tic = time.perf_counter()
            with tqdm(total=len(train_loader) if hasattr(train_loader, "__len__") else None, disable=disable,
                      desc=f"epoch {epoch + 1}/{epochs}", unit="batch", dynamic_ncols=True) as bar:
                train = _train_epoch(model, train_loader, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                                     task=task, device=device, amp_dtype=amp_dtype, scaler=scaler,
                                     channels_last=channels_last, bar=None if bar.disable else bar)
                if train.bad_step is not None:
                    history.stop_reason = f"non-finite loss at epoch {epoch + 1} step {train.bad_step}"
                    warnings.warn(f"fit: {history.stop_reason}; stopped the run"
                                  + (" and restored the best weights so far" if restore_best else "")
                                  + ". Try a lower lr (or amp=False).", RuntimeWarning, stacklevel=2)
                    break
                val = None
                if val_loader is not None:
                    set_train_mode(net, False)
                    val = _eval_sums(net, val_loader, device=device, task=task, loss_fn=loss_fn,
                                     amp_dtype=amp_dtype, channels_last=channels_last)
                _append(history, epoch + 1, train, val, task=task, lr=epoch_lr, seconds=time.perf_counter() - tic)
                if not bar.disable:
                    bar.set_postfix(_summary(history), refresh=True)

            improved = tracker.update(getattr(history, monitored)[-1], epoch=epoch + 1) if monitored else True
            if not monitored:
                tracker.best_epoch = epoch + 1
            history.best_epoch, history.best_value = tracker.best_epoch, tracker.best_value
            if improved and restore_best:
                best_state = _cpu_copy(net.state_dict())
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(getattr(history, monitored or "train_loss")[-1])
            for cb in callbacks:
                if hasattr(cb, "on_epoch_end"):
                    cb.on_epoch_end(epoch, net, optimizer, history)
            if tracker.should_stop:
                history.stopped_early = True
                history.stop_reason = (f"early stopping: {monitor} did not improve for {tracker.patience} epochs "
                                       f"(best {tracker.best_value:.4g} at epoch {tracker.best_epoch})")
            if checkpoint is not None:
                save_checkpoint(checkpoint, net=net, optimizer=optimizer, scheduler=scheduler, history=history,
                                epoch=epoch + 1, callbacks=callbacks, early_stopping=tracker, generators=generators,
                                best_model=None if improved else best_state)
            if live_plot and distributed.is_main_process():
                _live_plot(history)
            if history.stopped_early:
                break
    except KeyboardInterrupt:
        history.interrupted = True
        history.stop_reason = f"interrupted (KeyboardInterrupt) during epoch {epoch + 1}"
        print(f"fit: {history.stop_reason}; returning the history of {len(history)} finished epoch(s)"
              + (" with the best weights restored" if restore_best else ""))
    if restore_best and best_state is not None and (history.stop_reason or history.best_epoch != len(history)):
        net.load_state_dict(best_state)
    return history


def _append(history: History, epoch: int, train: _EpochResult, val: dict[str, float] | None, *, task: str,
            lr: float, seconds: float) -> None:
    classify = task == "classification"
    history.epoch.append(epoch)
    history.train_loss.append(train.loss)
    history.train_acc.append(train.metric if classify else None)
    history.train_mae.append(None if classify else train.metric)
    history.val_loss.append(val["loss"] if val else None)
    history.val_acc.append(val["acc"] if val and classify else None)
    history.val_mae.append(val["mae"] if val and not classify else None)
    history.lr.append(lr)
    history.seconds.append(seconds)
    history.images_per_second.append(train.count / train.seconds if train.seconds > 0 else math.nan)


def _summary(history: History) -> dict[str, str]:
    """The epoch's numbers for the progress bar's last update."""
    shown = {}
    for name in ("train_loss", "train_acc", "train_mae", "val_loss", "val_acc", "val_mae"):
        value = getattr(history, name)[-1]
        if value is not None:
            shown[name] = f"{value:.4f}"
    shown["img/s"] = f"{history.images_per_second[-1]:.0f}"
    return shown
