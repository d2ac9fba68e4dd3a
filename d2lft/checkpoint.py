"""Checkpoints: everything a run needs to resume exactly, written atomically and read safely.

`save_checkpoint` writes the weights (last and best), the optimizer, the scheduler, the history,
every callback's state and every random number generator; `load_checkpoint` reads it back with
``weights_only=True`` (no pickled code runs) and refuses, in one line, a file that is not a
checkpoint or does not fit the model.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from d2lft import distributed
from d2lft.errors import D2LFTError
from d2lft.net import Net

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_finetuned"]

CHECKPOINT_FORMAT = "d2lft-checkpoint-v1"


class CheckpointError(D2LFTError, RuntimeError):
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
    history: Any = None,
    epoch: int | None = None,
    callbacks: Iterable[Any] = (),
    extra: Mapping[str, Any] | None = None,
    best_model: Mapping[str, torch.Tensor] | None = None,
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
        "rng": _rng_state(generators),
        "extra": dict(extra) if extra is not None else {},
    }
    _write(path, payload)
    return path


def _write(path: Path, payload: Mapping[str, Any]) -> None:
    """torch.save `payload` to `path` atomically: a temporary file renamed over it once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        parts = [f"{path}: the checkpoint does not fit this model ({_describe(_model_info(net))}); "
                 f"it was saved from {_describe(info)}"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{title} ({len(items)}): {_short(items)}")
        hint = (f"ft.create_model({info['name']!r}, num_classes={info['num_outputs']})"
                if info.get("name") and info.get("num_outputs") else "the same architecture")
        parts.append(f"create the model it was saved from first ({hint}), then load it")
        raise CheckpointError("; ".join(parts))
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
    d2lft.checkpoint.CheckpointError: ...run.pt: the checkpoint does not fit this model (Linear); ...
    """
    path = Path(path)
    return _restore(path, _read(path), net, optimizer=optimizer, scheduler=scheduler, callbacks=callbacks,
                    best=best)


def _read(path: Path) -> dict[str, Any]:
    """The contents of the checkpoint at `path` (weights_only), or one CheckpointError saying what is wrong."""
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
    return dict(data)


def _restore(path: Path, data: Mapping[str, Any], net: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
             scheduler: Any = None, callbacks: Iterable[Any] = (), best: bool = False) -> dict[str, Any]:
    """Put the contents `_read` from `path` into `net` (and the optimizer, scheduler, callbacks)."""
    info = data.get("model_info") if isinstance(data.get("model_info"), Mapping) else {}
    weights = data["model"] if not best or data.get("best_model") is None else data["best_model"]
    if not (isinstance(weights, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in weights.items())):
        raise CheckpointError(f"{path}: its weights are not a state dict of tensors ({type(weights).__name__}); "
                              "the file was not written by d2lft.save_checkpoint or torch.save(net.state_dict())")
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


def load_finetuned(path: str | Path) -> Net:
    """The model a ``d2lft finetune --checkpoint PATH`` run saved: architecture, weights, class names
    and the preprocessing it was trained with, ready for `d2lft.classify` or ``d2lft predict``.

    >>> import tempfile
    >>> from d2lft.models import create_model
    >>> net = create_model("efficientnet_lite0", num_classes=2)
    >>> path = save_checkpoint(Path(tempfile.mkdtemp()) / "run.pt", net=net,
    ...                        extra={"classes": ["ants", "bees"], "model": "efficientnet_lite0"})
    >>> load_finetuned(path).categories
    ['ants', 'bees']
    """
    import dataclasses

    from d2lft.models import create_model, list_models
    from d2lft.net import Preprocessing

    path = Path(path)
    data = _read(path)
    extra = data.get("extra") if isinstance(data.get("extra"), Mapping) else {}
    classes, name = extra.get("classes"), extra.get("model")
    if not classes or name not in list_models():
        raise CheckpointError(f"{path}: not a checkpoint of `d2lft finetune` (it names no model and classes); "
                              "save one with d2lft finetune DATA --checkpoint PATH")
    net = create_model(name, num_classes=len(classes), pretrained=False)
    _restore(path, data, net, best=True)  # the weights the run handed back, not its last epoch's
    net.categories = list(classes)
    tta = extra.get("tta")  # the test-time augmentation the run chose, which classify applies
    net.tta = {k: bool(v) for k, v in tta.items() if k in ("flip", "rotate")} if isinstance(tta, Mapping) else None
    saved = extra.get("preprocessing")
    if isinstance(saved, dict):
        fields = {f.name for f in dataclasses.fields(Preprocessing)}
        net.preprocessing = Preprocessing(**{k: v for k, v in saved.items() if k in fields})
    net.eval()
    return net
