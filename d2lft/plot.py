"""Pure plotting helpers: training curves, the learning-rate finder, images, confusion matrices.

Every function draws on the ``ax`` (or ``fig``) you pass, or on a new figure made with
``plt.subplots`` when you pass none, and returns what it drew on; none of them changes global
matplotlib settings (``rcParams``, styles) or calls ``plt.show()``. Single plots return
an ``Axes``; image grids return the ``Figure``.

>>> import matplotlib.pyplot as plt
>>> ax = plot_bars({"probe": 0.81, "finetune": 0.93}, ylabel="val accuracy")
>>> [float(p.get_height()) for p in ax.patches]
[0.81, 0.93]
>>> plt.close(ax.figure)
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from torch import nn

from d2lft.metrics import confusion_matrix
from d2lft.errors import ConfigError

__all__ = [
    "LivePlot",
    "plot_history",
    "plot_lr_find",
    "plot_schedules",
    "show_images",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_filters",
    "plot_bars",
    "plot_against",
    "plot_trainable",
]

_LABELS = {
    "loss": "loss",
    "acc": "accuracy",
    "mae": "mean absolute error",
    "lr": "learning rate",
    "seconds": "seconds per epoch",
    "images_per_second": "images / second",
}


def _new_axes(ax: Any, *, figsize: tuple[float, float]) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _new_figure(fig: Any, *, figsize: tuple[float, float]) -> Any:
    if fig is not None:
        return fig
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize, layout="constrained")


def _as_floats(values: Any) -> np.ndarray:
    """A float array with NaN where a value is missing (None)."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=float)


def _history_dict(history: Any) -> dict[str, Any]:
    if hasattr(history, "to_dict"):
        return dict(history.to_dict())
    if dataclasses.is_dataclass(history) and not isinstance(history, type):
        return dataclasses.asdict(history)
    if isinstance(history, Mapping):
        return dict(history)
    raise TypeError(f"plot_history: expected a d2lft History or its to_dict(), got {type(history).__name__}")


# ----------------------------------------------------------------------------- training curves


def plot_history(
    history: Any,
    *,
    ax: Any = None,
    metrics: str | Sequence[str] | None = None,
    best: bool = True,
) -> Any:
    """Train and validation curves per epoch, one panel per metric.

    `history` is a `d2lft.History` or its ``to_dict()``. A metric ``m`` plots the lists
    ``train_m`` and ``val_m`` (those that hold values), or the list ``m`` itself (e.g. ``"lr"``,
    ``"seconds"``, ``"images_per_second"``). `metrics` defaults to ``("loss", "acc")``, or
    ``("loss", "mae")`` when the history has no accuracy (regression).

    Returns what matplotlib's ``squeeze`` would: one ``Axes`` when `metrics` is a string,
    otherwise a numpy array of ``Axes``, one per metric. Pass `ax` to draw on your own axes (one
    ``Axes`` for a string, a sequence of ``len(metrics)`` otherwise). With `best`, a dotted
    vertical line marks ``history.best_epoch``.

    >>> import matplotlib.pyplot as plt
    >>> h = {"epoch": [1, 2, 3], "train_loss": [0.9, 0.5, 0.3], "val_loss": [0.8, 0.6, 0.7],
    ...      "train_acc": [0.6, 0.8, 0.9], "val_acc": [0.7, 0.8, 0.75], "best_epoch": 2}
    >>> axes = plot_history(h)
    >>> [len(a.lines) for a in axes]  # train, val and the best-epoch marker
    [3, 3]
    >>> plt.close(axes[0].figure)
    """
    data = _history_dict(history)
    if metrics is None:
        has_acc = any(v is not None for key in ("train_acc", "val_acc") for v in data.get(key) or [])
        has_mae = any(v is not None for key in ("train_mae", "val_mae") for v in data.get(key) or [])
        metrics = ("loss", "mae") if has_mae and not has_acc else ("loss", "acc")
    single = isinstance(metrics, str)
    names = [metrics] if single else list(metrics)
    if not names:
        raise ConfigError("plot_history: metrics is empty; pass e.g. metrics=('loss', 'acc')")

    if ax is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), layout="constrained", squeeze=False)
        axes = axes[0]
    else:
        axes = np.array([ax], dtype=object) if single else np.asarray(ax, dtype=object).ravel()
        if len(axes) != len(names):
            raise ConfigError(
                f"plot_history: got {len(axes)} Axes for {len(names)} metrics {names}; pass one Axes per "
                "metric (e.g. plt.subplots(1, 2)[1]) or a single metric name as a string"
            )

    epochs_raw = data.get("epoch") or []
    for name, axis in zip(names, axes):
        series = [(label, data.get(key)) for label, key in (("train", f"train_{name}"), ("val", f"val_{name}"))]
        series = [(label, _as_floats(v)) for label, v in series if v]
        series = [(label, y) for label, y in series if not np.all(np.isnan(y))]
        if not series and data.get(name):
            series = [(name, _as_floats(data[name]))]
        if not series:
            available = sorted(k for k, v in data.items() if isinstance(v, list) and v)
            raise ConfigError(f"plot_history: the history has no values for metric {name!r}; lists with values: {available}")
        for label, y in series:
            if len(epochs_raw) == len(y):
                x = np.asarray(epochs_raw, dtype=float)
            else:  # e.g. a per-batch learning rate: spread it over the epochs
                num_epochs = len(epochs_raw) or len(y)
                x = np.linspace(0, num_epochs, len(y), endpoint=False) + (1 if not epochs_raw else float(epochs_raw[0]))
            axis.plot(x, y, marker="o" if len(y) <= 30 else None, markersize=3, label=label)
        best_epoch = data.get("best_epoch")
        if best and best_epoch is not None:
            axis.axvline(float(best_epoch), color="grey", linestyle=":", linewidth=1, label=f"best (epoch {best_epoch})")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
        axis.set_xlabel("epoch")
        axis.set_ylabel(_LABELS.get(name, name))
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return axes[0] if single else axes


def plot_lr_find(result: Any, *, ax: Any = None, raw: bool = False) -> Any:
    """The learning-rate finder's loss against the learning rate (log x), the suggestion marked.

    `result` is a `d2lft.LRFindResult` (or anything with ``lrs``, ``losses`` and ``suggestion``).
    Draws the smoothed loss, then a dashed vertical line at the suggestion (and, with `raw`, the
    unsmoothed losses first, faintly).

    >>> import matplotlib.pyplot as plt
    >>> from types import SimpleNamespace
    >>> r = SimpleNamespace(lrs=[1e-4, 1e-3, 1e-2, 1e-1], losses=[1.0, 0.8, 0.5, 2.0], suggestion=1e-3)
    >>> ax = plot_lr_find(r)
    >>> ax.get_xscale(), len(ax.lines)
    ('log', 2)
    >>> plt.close(ax.figure)
    """
    if isinstance(result, Mapping):
        lrs, losses, suggestion = result["lrs"], result["losses"], result.get("suggestion")
        raw_losses = result.get("raw_losses")
    else:
        lrs, losses, suggestion = result.lrs, result.losses, getattr(result, "suggestion", None)
        raw_losses = getattr(result, "raw_losses", None)
    if len(lrs) != len(losses) or not lrs:
        raise ConfigError(f"plot_lr_find: need as many losses as lrs (at least one), got {len(lrs)} and {len(losses)}")
    ax = _new_axes(ax, figsize=(5, 3.4))
    if raw and raw_losses:
        ax.plot(lrs[: len(raw_losses)], raw_losses, color="C0", alpha=0.25, linewidth=1, label="loss per batch")
    ax.plot(lrs, losses, color="C0", label="smoothed loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="C3", linestyle="--", linewidth=1, label=f"suggestion {suggestion:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


def plot_schedules(
    curves: Mapping[str, Sequence[float]],
    *,
    ax: Any = None,
    steps_per_epoch: int | None = None,
    log: bool = False,
) -> Any:
    """Learning rate against training step for several schedules, one line each.

    `curves` maps a name to the learning rate at each batch (see `d2lft.schedule_curve`). With
    `steps_per_epoch` the x axis counts epochs instead of batches; `log` uses a log y axis.

    >>> import matplotlib.pyplot as plt
    >>> ax = plot_schedules({"constant": [0.1] * 4, "step": [0.1, 0.1, 0.01, 0.01]})
    >>> [line.get_label() for line in ax.lines]
    ['constant', 'step']
    >>> plt.close(ax.figure)
    """
    if not curves:
        raise ConfigError("plot_schedules: curves is empty; pass {name: learning rates per step}")
    ax = _new_axes(ax, figsize=(5.5, 3.4))
    for name, lrs in curves.items():
        x = np.arange(len(lrs), dtype=float)
        if steps_per_epoch:
            x = x / steps_per_epoch
        ax.plot(x, list(lrs), label=name)
    ax.set_xlabel("epoch" if steps_per_epoch else "step (batch)")
    ax.set_ylabel("learning rate")
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ax


# ----------------------------------------------------------------------------- images


def _to_hwc(image: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """One image as an (H, W, 3) or (H, W) array that imshow shows as intended."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):  # already (H, W[, C])
        return image
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"show_images: expected tensors, PIL images or numpy arrays, got {type(image).__name__}")
    x = image.detach().cpu()
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ConfigError(f"show_images: expected images of shape (3, H, W) or (1, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        array = x.permute(1, 2, 0).numpy()
    else:
        x = x.float()
        if mean is not None or std is not None:
            m = torch.tensor(mean if mean is not None else [0.0] * x.shape[0]).view(-1, 1, 1)
            s = torch.tensor(std if std is not None else [1.0] * x.shape[0]).view(-1, 1, 1)
            x = x * s + m  # undo Normalize(mean, std)
        array = x.clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def _image_list(images: Any) -> list[Any]:
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            return [images]
        if images.ndim == 4:
            return list(images)
        raise ConfigError(f"show_images: expected a batch (B, C, H, W) or one image (C, H, W), got {tuple(images.shape)}")
    return list(images)


def _grid(
    arrays: list[np.ndarray],
    *,
    titles: Sequence[str] | None,
    ncols: int,
    fig: Any,
    size: float,
    interpolation: str | None = None,
) -> Any:
    if not arrays:
        raise ConfigError("show_images: no images to show")
    if titles is not None and len(titles) != len(arrays):
        raise ConfigError(f"show_images: got {len(titles)} titles for {len(arrays)} images")
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ConfigError(f"show_images: ncols must be an int >= 1, got {ncols!r}")
    ncols = min(ncols, len(arrays))
    nrows = math.ceil(len(arrays) / ncols)
    fig = _new_figure(fig, figsize=(size * ncols, size * nrows + (0.3 * nrows if titles else 0)))
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, axis in enumerate(axes):
        axis.set_axis_off()
        if i >= len(arrays):
            continue
        array = arrays[i]
        cmap = "gray" if array.ndim == 2 else None
        axis.imshow(array, cmap=cmap, interpolation=interpolation)
        if titles is not None:
            axis.set_title(str(titles[i]), fontsize="small")
    return fig


def show_images(
    images: Any,
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 8,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    fig: Any = None,
    size: float = 1.6,
) -> Any:
    """A grid of images; returns the ``Figure``.

    `images` is a batch tensor ``(B, 3, H, W)`` (or ``(B, 1, H, W)``), a list of such
    ``(C, H, W)`` tensors (sizes may differ), PIL images or ``(H, W, 3)`` arrays. ``uint8``
    tensors are shown as they are; float tensors are first un-normalised with `mean` and `std`
    when given (the inverse of ``Normalize(mean, std)``), then clipped to ``[0, 1]``. Each image
    takes `size` inches; pass `fig` to draw on an existing (empty) figure.

    >>> import matplotlib.pyplot as plt
    >>> fig = show_images(torch.zeros(5, 3, 8, 8), ncols=4, titles=list("abcde"))
    >>> sum(len(a.images) for a in fig.axes), len(fig.axes)
    (5, 8)
    >>> plt.close(fig)
    """
    arrays = [_to_hwc(image, mean, std) for image in _image_list(images)]
    return _grid(arrays, titles=titles, ncols=ncols, fig=fig, size=size)


def plot_filters(
    weight: torch.Tensor | nn.Module,
    *,
    ncols: int = 8,
    max_filters: int = 64,
    fig: Any = None,
    size: float = 0.8,
) -> Any:
    """The filters of a convolution as small images; returns the ``Figure``.

    `weight` is a conv weight ``(out, in, kh, kw)``, an ``nn.Conv2d``, or any module, whose first
    ``nn.Conv2d`` is used (for a `d2lft.Net`: the first layer, whose filters look like edge and
    colour detectors). Filters with 3 input channels are shown in colour, others as the grey mean
    over channels; each filter is scaled to ``[0, 1]`` on its own. At most `max_filters` are shown.

    >>> import matplotlib.pyplot as plt
    >>> fig = plot_filters(nn.Conv2d(3, 16, 5), ncols=8)
    >>> sum(len(a.images) for a in fig.axes)
    16
    >>> plt.close(fig)
    """
    if isinstance(weight, nn.Module):
        conv = weight if isinstance(weight, nn.Conv2d) else next((m for m in weight.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ConfigError(f"plot_filters: {type(weight).__name__} has no nn.Conv2d layer; pass a conv weight tensor")
        weight = conv.weight
    w = weight.detach().cpu().float()
    if w.ndim != 4:
        raise ConfigError(f"plot_filters: expected a conv weight of shape (out, in, kh, kw), got {tuple(w.shape)}")
    w = w[:max_filters]
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True)
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    high = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - low) / (high - low).clamp_min(1e-12)
    arrays = [_to_hwc(f, None, None) for f in w]
    return _grid(arrays, titles=None, ncols=ncols, fig=fig, size=size, interpolation="nearest")


# ----------------------------------------------------------------------------- evaluation


def plot_confusion_matrix(
    targets: Any,
    predictions: Any,
    *,
    classes: Sequence[str],
    ax: Any = None,
    cmap: str = "Blues",
) -> Any:
    """The confusion matrix as a heat map, each cell annotated with its count.

    Rows are the true classes, columns the predicted ones. `predictions` may be class indices
    or the ``(N, C)`` probabilities of `d2lft.predict`.

    >>> import matplotlib.pyplot as plt
    >>> ax = plot_confusion_matrix([0, 0, 1], [0, 1, 1], classes=["ants", "bees"])
    >>> [t.get_text() for t in ax.texts]
    ['1', '1', '0', '1']
    >>> plt.close(ax.figure)
    """
    names = [str(c) for c in classes]
    counts = confusion_matrix(targets, predictions, len(names)).numpy()
    side = 1.2 + 0.55 * len(names)
    ax = _new_axes(ax, figsize=(side + 1, side))
    image = ax.imshow(counts, cmap=cmap, vmin=0)
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, labels=names, rotation=45 if len(names) > 4 else 0)
    ax.set_yticks(ticks, labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"accuracy {accuracy:.1%} ({counts.sum()} images)", fontsize="medium")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_reliability(reliability: Any, *, ax: Any = None, label: str | None = None) -> Any:
    """A reliability diagram: accuracy against confidence per bin, the diagonal a calibrated model follows.

    `reliability` is what ``d2lft.calibration.reliability(targets, probs)`` returns. Each bar is
    a bin's accuracy (empty bins have none); the red part up to its mean confidence is the gap
    (above the bar: overconfident). The title gives the expected calibration error; `label`
    names the model in it.

    >>> import matplotlib.pyplot as plt
    >>> from d2lft.calibration import reliability
    >>> ax = plot_reliability(reliability([0, 0, 0, 1], torch.tensor([[0.9, 0.1]] * 4), bins=5))
    >>> [round(float(p.get_height()), 2) for p in ax.patches], ax.get_title()
    ([0.75, 0.15], 'ECE 15.0%')
    >>> plt.close(ax.figure)
    """
    edges = list(reliability.edges)
    filled = [b for b, n in enumerate(reliability.counts) if n]
    lefts = [edges[b] for b in filled]
    widths = [edges[b + 1] - edges[b] for b in filled]
    accuracy = [reliability.accuracy[b] for b in filled]
    gaps = [reliability.confidence[b] - reliability.accuracy[b] for b in filled]
    ax = _new_axes(ax, figsize=(3.6, 3.4))
    ax.bar(lefts, accuracy, width=widths, align="edge", color="C0", edgecolor="white", label="accuracy")
    ax.bar(lefts, gaps, bottom=accuracy, width=widths, align="edge", color="C3", alpha=0.35, edgecolor="C3",
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{label + ': ' if label else ''}ECE {reliability.ece:.1%}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left")
    return ax


def plot_bars(
    values: Mapping[str, float | Sequence[float]],
    *,
    ax: Any = None,
    ylabel: str = "",
    errors: Mapping[str, float] | None = None,
    fmt: str = "{:.3g}",
    title: str | None = None,
) -> Any:
    """One bar per entry of `values` (e.g. val accuracy per strategy), each labelled with its value.

    A value may be a list of results over seeds: its bar shows their mean, with an error bar of
    their sample standard deviation. `errors` (same keys) sets error bars instead; `fmt` formats
    the labels.

    >>> import matplotlib.pyplot as plt
    >>> ax = plot_bars({"a": 1.0, "b": 2.5}, ylabel="seconds")
    >>> [t.get_text() for t in ax.texts]
    ['1', '2.5']
    >>> plt.close(ax.figure)
    >>> ax = plot_bars({"none": [0.78, 0.80, 0.76], "crop+flip": [0.81, 0.84, 0.78]}, fmt="{:.2f}")
    >>> [t.get_text() for t in ax.texts]
    ['0.78', '0.81']
    >>> plt.close(ax.figure)
    """
    if not values:
        raise ConfigError("plot_bars: values is empty; pass {name: number}")
    names = list(values)
    seeded = {n: [float(v) for v in values[n]] for n in names if isinstance(values[n], Sequence)}
    if seeded and errors is None:
        errors = {n: statistics.stdev(seeded[n]) if len(seeded.get(n, ())) > 1 else 0.0 for n in names}
    heights = [statistics.fmean(seeded[n]) if n in seeded else float(values[n]) for n in names]
    yerr = None
    if errors is not None:
        missing = [n for n in names if n not in errors]
        if missing:
            raise ConfigError(f"plot_bars: errors has no entry for {missing}")
        yerr = [float(errors[n]) for n in names]
    # Long names wrap onto lines of at most 14 characters, and each bar gets room for its widest line,
    # so that neighbouring labels never overlap.
    labels = [textwrap.fill(str(n), 14, break_long_words=False) for n in names]
    widest = max(len(line) for label in labels for line in label.splitlines())
    per_bar = max(0.9, 0.075 * widest + 0.25)
    ax = _new_axes(ax, figsize=(max(3.0, 1.0 + per_bar * len(names)), 3.2))
    positions = range(len(names))
    bars = ax.bar(positions, heights, yerr=yerr, capsize=4 if yerr else 0,
                  color=[f"C{i % 10}" for i in range(len(names))])
    ax.set_xticks(positions, labels)
    ax.bar_label(bars, labels=[fmt.format(h) for h in heights], fontsize="small", padding=2)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.margins(y=0.15)
    return ax


def plot_against(
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], Sequence[float] | None]],
    *,
    labels: Sequence[str] | None = None,
    ax: Any = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
) -> Any:
    """One marker per point and series, with error bars: e.g. accuracy against ImageNet top-1.

    `series` maps a name to ``(means, sds)`` (``sds`` may be None), one value per `x`; `labels`
    names the points (written beside the first series' markers).

    >>> import matplotlib.pyplot as plt
    >>> ax = plot_against([75.1, 77.6], {"probe": ([0.93, 0.91], [0.01, 0.02])}, labels=["a", "b"])
    >>> [t.get_text() for t in ax.texts], ax.get_legend().texts[0].get_text()
    (['a', 'b'], 'probe')
    >>> plt.close(ax.figure)
    """
    if not series:
        raise ConfigError("plot_against: series is empty; pass {name: (means, sds)}")
    xs = _as_floats(x)
    ax = _new_axes(ax, figsize=(4.5, 3.2))
    markers = "osD^v<>"
    for k, (name, (means, sds)) in enumerate(series.items()):
        ys = _as_floats(means)
        if len(ys) != len(xs):
            raise ConfigError(f"plot_against: series {name!r} has {len(ys)} values for {len(xs)} x values")
        yerr = None if sds is None else _as_floats(sds)
        ax.errorbar(xs, ys, yerr=yerr, fmt=markers[k % len(markers)], capsize=3, label=name)
        if k == 0 and labels is not None:
            for xi, yi, text in zip(xs, ys, labels):
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def _short(n: float) -> str:
    """A parameter count for a label: 950, 12.3k, 4.01M."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= limit:
            return f"{n / limit:.3g}{suffix}"
    return f"{n:.0f}"


def plot_trainable(net: Any, *, ax: Any = None) -> Any:
    """Parameters per block of a `d2lft.Net`, split into trainable (green) and frozen (grey).

    One horizontal bar per block (input at the top), then backbone parameters outside the listed
    blocks (if any) and the head; each bar is a trainable part and a frozen part stacked, so
    ``ax.patches`` holds two patches per bar. The title gives the trainable total.

    >>> import matplotlib.pyplot as plt
    >>> from d2lft.net import Net
    >>> net = Net(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2),
    ...           blocks=["0", "1"], num_features=4, name="toy")
    >>> net.backbone[0].requires_grad_(False)
    Linear(...)
    >>> ax = plot_trainable(net)
    >>> ax.get_title()
    'trainable: 30 of 50 parameters (60.0%)'
    >>> plt.close(ax.figure)
    """
    units = net.parts()

    names = [name for name, _ in units]
    trainable = np.array([sum(p.numel() for p in ps if p.requires_grad) for _, ps in units], dtype=float)
    frozen = np.array([sum(p.numel() for p in ps if not p.requires_grad) for _, ps in units], dtype=float)
    ax = _new_axes(ax, figsize=(5.5, 0.9 + 0.3 * len(units)))
    y = np.arange(len(units))
    ax.barh(y, trainable, color="C2", label="trainable")
    stacked = ax.barh(y, frozen, left=trainable, color="0.75", label="frozen")
    ax.bar_label(stacked, labels=[_short(n) for n in trainable + frozen], fontsize="small", padding=3)
    ax.margins(x=0.15)
    ax.set_yticks(y, labels=names)
    ax.invert_yaxis()  # input at the top, head at the bottom
    ax.set_xlabel("parameters")
    total = trainable.sum() + frozen.sum()
    share = trainable.sum() / total if total else 0.0
    ax.set_title(f"trainable: {int(trainable.sum()):,} of {int(total):,} parameters ({share:.1%})", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return ax


class LivePlot:
    """A `d2lft.fit` callback that redraws `plot_history` after every epoch in a notebook.

    Outside a notebook (or on another process than the main one under torchrun) it does nothing.
    ``ft.fit(net, train, val, epochs=10, callbacks=[ft.plot.LivePlot()])``
    """

    def on_epoch_end(self, run: Any) -> None:
        from d2lft import distributed
        from d2lft.callbacks import _in_notebook

        if not _in_notebook() or not distributed.is_main_process():
            return
        import matplotlib.pyplot as plt
        from IPython.display import clear_output

        clear_output(wait=True)
        plot_history(run.history)
        plt.show()
