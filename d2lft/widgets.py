"""Interactive explorers for the book: move a control, see the figure change.

Each function returns an `Explorer` (an ``ipywidgets.VBox``: the controls above an ``Output``)
that already holds a figure for its initial settings, so a page rendered without a kernel still
shows something useful. Figures are made with ``matplotlib.figure.Figure`` (outside pyplot), drawn
to a PNG, and the PNG *replaces* the Output's content: nothing is shown twice, no figure stays
open, and global matplotlib state is untouched. Each update is small enough to stay interactive
on a 2-core CPU; sliders update when released.

>>> explorer = schedule_explorer(epochs=4, steps_per_epoch=5)
>>> sorted(explorer.controls)
['compare', 'gamma', 'schedule', 'step_epochs', 'warmup_epochs']
>>> explorer.output.outputs[0]["data"]["image/png"][:8]  # base64 of a PNG
'iVBORw0K'
"""
from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure
from torch import nn
from torchvision.transforms import v2

from d2lft import plot
from d2lft.errors import ConfigError
from d2lft.freeze import preserved, train_last
from d2lft.images import load_image
from d2lft.net import Net, Preprocessing
from d2lft.optim import SCHEDULERS, schedule_curve
from d2lft.transforms import AUGMENT_PRESETS, train_transform

__all__ = ["Explorer", "augmentation_explorer", "schedule_explorer", "freeze_explorer"]

_DPI = 80  # keeps the PNGs stored in a notebook small


class Explorer(widgets.VBox):
    """Controls above an ``Output`` that shows the current figure.

    Attributes:
        controls: the control widgets by name (set ``.value`` to change a setting from code).
        output: the ``ipywidgets.Output`` holding the figure (one PNG display output).
    """

    def __init__(self, controls: Mapping[str, widgets.Widget], output: widgets.Output, *, rows: Sequence[Sequence[str]]) -> None:
        boxes = [widgets.HBox([controls[name] for name in row]) for row in rows]
        super().__init__([*boxes, output])
        self.controls = dict(controls)
        self.output = output

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        # Viewers without widget support (GitHub, nbviewer) fall back to the current figure.
        data = super()._repr_mimebundle_(**kwargs)
        for item in self.output.outputs:
            png = item.get("data", {}).get("image/png")
            if png:
                data["image/png"] = png
                break
        return data


def _show_figure(output: widgets.Output, fig: Figure) -> None:
    """Replace what `output` shows with `fig` as a PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    width, height = fig.get_size_inches()
    output.outputs = (
        {
            "output_type": "display_data",
            "data": {
                "image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                "text/plain": f"<Figure size {width * _DPI:.0f}x{height * _DPI:.0f} with {len(fig.axes)} Axes>",
            },
            "metadata": {},
        },
    )


def _show_text(output: widgets.Output, text: str) -> None:
    output.outputs = ({"output_type": "stream", "name": "stdout", "text": text + "\n"},)


def _on_change(callback: Callable[[], None], *controls: widgets.Widget) -> None:
    for control in controls:
        control.observe(lambda _change: callback(), names="value")


# ----------------------------------------------------------------------------- augmentation


def _as_uint8(image: Any, *, where: str) -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.min() < 0 or image.max() > 1:
            raise ConfigError(
                f"{where}: float images must hold values in [0, 1], got [{float(image.min()):.2f}, "
                f"{float(image.max()):.2f}]; pass PIL images or uint8 tensors, not normalized ones"
            )
        image = (image * 255).round().to(torch.uint8)
    tensor = v2.functional.to_image(image).as_subclass(torch.Tensor)
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ConfigError(f"{where}: expected RGB images (3, H, W), got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor


def _custom_transform(*, image_size: int, scale_min: float, flip: float, rotation: float, color: float) -> v2.Compose:
    """The augmentation the sliders describe, on uint8 tensors."""
    steps: list[Any] = []
    if scale_min < 1:
        steps.append(v2.RandomResizedCrop(image_size, scale=(scale_min, 1.0), antialias=True))
    else:
        steps.append(v2.CenterCrop(image_size))
    if flip > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip))
    if rotation > 0:
        steps.append(v2.RandomRotation(rotation))
    if color > 0:  # strength 0.3 is the "crop+flip+color" preset's jitter
        steps.append(v2.ColorJitter(brightness=color, contrast=color, saturation=color, hue=min(color / 6, 0.5)))
    return v2.Compose(steps)


def augmentation_explorer(
    images: Any,
    preprocessing: Net | Preprocessing,
    *,
    image_size: int | None = None,
    seed: int = 0,
    versions: int = 5,
    max_images: int = 3,
) -> Explorer:
    """Augmented versions of a few images, for a training preset or your own settings.

    `images`: PIL images, image paths, uint8 tensors ``(3, H, W)`` or a uint8 batch; the first
    `max_images` are used. `preprocessing` is the model (or its ``.preprocessing``), at
    `image_size` if given. Each image is first resized like the training cache (the model's
    evaluation resize and a square crop), then shown as ``original`` (the evaluation crop)
    followed by `versions` augmented copies. The ``preset`` control picks
    `d2lft.transforms.train_transform` presets; moving a
    slider switches to ``"custom"``: ``RandomResizedCrop(scale=(crop scale min, 1))`` (a center
    crop at 1), ``RandomHorizontalFlip(p)``, ``RandomRotation(degrees)`` and
    ``ColorJitter(s, s, s, hue=s/6)``. Randomness comes from `seed` (the global torch RNG is
    restored afterwards); "new samples" draws new ones.

    >>> from PIL import Image
    >>> explorer = augmentation_explorer([Image.new("RGB", (60, 40), "orange")], Preprocessing(image_size=32),
    ...                                  versions=2)
    >>> explorer.controls["preset"].value
    'crop+flip'
    """
    where = "augmentation_explorer"
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)
    images = list(images)[:max_images]
    if not images:
        raise ConfigError(f"{where}: no images given; pass a few PIL images, paths or uint8 tensors")
    if isinstance(versions, bool) or not isinstance(versions, int) or versions < 1:
        raise ConfigError(f"{where}: versions must be an int >= 1, got {versions!r}")
    if isinstance(preprocessing, Net):
        preprocessing = preprocessing.preprocessing
    preprocessing = preprocessing.with_size(image_size)
    image_size, mean, std = preprocessing.image_size, preprocessing.mean, preprocessing.std
    side = preprocessing.resize_size()
    prepare = v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(side)])
    base = [prepare(_as_uint8(image, where=where)) for image in images]
    original = v2.CenterCrop(image_size)

    slider = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls: dict[str, widgets.Widget] = {
        "preset": widgets.Dropdown(options=[*AUGMENT_PRESETS, "custom"], value="crop+flip", description="preset"),
        "scale_min": widgets.FloatSlider(0.25, min=0.05, max=1.0, step=0.05, description="crop scale min", **slider),
        "flip": widgets.FloatSlider(0.5, min=0.0, max=1.0, step=0.1, description="flip prob", **slider),
        "rotation": widgets.IntSlider(0, min=0, max=180, step=5, description="rotation (deg)", **slider),
        "color": widgets.FloatSlider(0.0, min=0.0, max=1.0, step=0.05, description="colour jitter", **slider),
        "resample": widgets.Button(description="new samples"),
        "pipeline": widgets.HTML(),
    }
    output = widgets.Output()
    state = {"seed": seed}

    def draw() -> None:
        preset = controls["preset"].value
        if preset == "custom":
            transform = _custom_transform(
                image_size=image_size,
                scale_min=controls["scale_min"].value,
                flip=controls["flip"].value,
                rotation=controls["rotation"].value,
                color=controls["color"].value,
            )
        else:
            transform = train_transform(preprocessing, preset)
        controls["pipeline"].value = f"<pre style='font-size:80%;line-height:1.2'>{transform!r}</pre>"
        tiles, titles = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(state["seed"])
            for row, image in enumerate(base):
                tiles.append(original(image))
                tiles.extend(transform(image) for _ in range(versions))
                titles.extend(["original", *(f"version {v + 1}" for v in range(versions))] if row == 0 else [""] * (versions + 1))
        size = 1.5
        fig = Figure(figsize=(size * (versions + 1), size * len(base) + 0.3), layout="constrained")
        plot.show_images(tiles, titles=titles, ncols=versions + 1, mean=mean, std=std, fig=fig, size=size)
        _show_figure(output, fig)

    def on_slider() -> None:
        if controls["preset"].value != "custom":
            controls["preset"].value = "custom"  # its observer draws
        else:
            draw()

    def on_resample(_button: widgets.Button) -> None:
        state["seed"] += 1
        draw()

    controls["preset"].observe(lambda _change: draw(), names="value")
    _on_change(on_slider, *(controls[n] for n in ("scale_min", "flip", "rotation", "color")))
    controls["resample"].on_click(on_resample)
    draw()
    rows = [("preset", "resample"), ("scale_min", "flip"), ("rotation", "color"), ("pipeline",)]
    return Explorer(controls, output, rows=rows)


# ----------------------------------------------------------------------------- schedules


def schedule_explorer(*, epochs: int = 10, steps_per_epoch: int = 20, lr: float = 1e-3) -> Explorer:
    """The learning rate at every batch for a schedule of `d2lft.make_scheduler` and its knobs.

    Controls: the schedule, ``warmup_epochs`` (warmup_cosine, onecycle), ``step_epochs`` and
    ``gamma`` (step), and "compare" to draw all schedules with the same knobs. A setting the
    schedule refuses shows its error message instead of a figure.

    >>> explorer = schedule_explorer(epochs=3, steps_per_epoch=4)
    >>> explorer.controls["schedule"].value = "step"
    >>> explorer.controls["gamma"].disabled, explorer.controls["warmup_epochs"].disabled
    (False, True)
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"schedule_explorer: {name} must be an int >= 1, got {value!r}")
    slider = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls: dict[str, widgets.Widget] = {
        "schedule": widgets.Dropdown(options=list(SCHEDULERS), value="warmup_cosine", description="schedule"),
        "warmup_epochs": widgets.FloatSlider(
            min(1.0, epochs / 2), min=0.0, max=max(epochs - 0.5, 0.0), step=0.5, description="warmup epochs", **slider
        ),
        "step_epochs": widgets.IntSlider(max(1, epochs // 3), min=1, max=epochs, description="step every (epochs)", **slider),
        "gamma": widgets.FloatLogSlider(0.1, base=10, min=-3, max=0, step=0.25, description="gamma", **slider),
        "compare": widgets.Checkbox(False, description="compare all schedules"),
    }
    output = widgets.Output()

    def knobs(name: str) -> dict[str, Any]:
        if name == "step":
            return {"step_epochs": controls["step_epochs"].value, "gamma": controls["gamma"].value}
        if name in ("warmup_cosine", "onecycle"):
            return {"warmup_epochs": controls["warmup_epochs"].value}
        return {}

    def curve(name: str) -> list[float]:
        return schedule_curve(name, epochs=epochs, steps_per_epoch=steps_per_epoch, lr=lr, **knobs(name))

    def draw() -> None:
        chosen = controls["schedule"].value
        compare = controls["compare"].value
        controls["warmup_epochs"].disabled = not (compare or chosen in ("warmup_cosine", "onecycle"))
        controls["step_epochs"].disabled = controls["gamma"].disabled = not (compare or chosen == "step")
        try:
            curves = {chosen: curve(chosen)}
        except ValueError as error:
            _show_text(output, str(error))
            return
        skipped = []
        if compare:
            for name in SCHEDULERS:
                if name != chosen:
                    try:
                        curves[name] = curve(name)
                    except ValueError:
                        skipped.append(name)
        fig = Figure(figsize=(6, 3.4), layout="constrained")
        ax = plot.plot_schedules(curves, ax=fig.subplots(), steps_per_epoch=steps_per_epoch)
        ax.lines[0].set_linewidth(2.5)  # the chosen schedule
        note = f" (not shown: {', '.join(skipped)})" if skipped else ""
        ax.set_title(f"lr={lr:g}, {epochs} epochs x {steps_per_epoch} batches{note}", fontsize="medium")
        _show_figure(output, fig)

    _on_change(draw, *controls.values())
    draw()
    rows = [("schedule", "compare"), ("warmup_epochs",), ("step_epochs", "gamma")]
    return Explorer(controls, output, rows=rows)


# ----------------------------------------------------------------------------- freezing


def freeze_explorer(net: Net, *, k: int = 0) -> Explorer:
    """Which blocks ``d2lft.train_last(net, k)`` trains, and how many parameters that is.

    A slider sets ``k`` (0: the head only, ``len(net.blocks())``: everything); the chart shows the
    parameters of each block, trainable or frozen (`d2lft.plot.plot_trainable`). `net` itself is
    left as it was: ``requires_grad`` flags and gradients are restored after each drawing.

    >>> from d2lft.net import Net
    >>> net = Net(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2),
    ...           blocks=["0", "1"], num_features=4, name="toy")
    >>> explorer = freeze_explorer(net)
    >>> explorer.controls["k"].value = 2
    >>> all(p.requires_grad for p in net.parameters())
    True
    """
    num_blocks = len(net.blocks())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= num_blocks:
        raise ConfigError(f"freeze_explorer: k must be an int from 0 to {num_blocks} (blocks of {net.name!r}), got {k!r}")
    controls: dict[str, widgets.Widget] = {
        "k": widgets.IntSlider(
            k, min=0, max=num_blocks, description="train last k blocks", continuous_update=False,
            style={"description_width": "initial"}, layout={"width": "420px"},
        ),
    }
    output = widgets.Output()

    def draw() -> None:
        fig = Figure(figsize=(6, 1.0 + 0.3 * (num_blocks + 2)), layout="constrained")
        with preserved(net):
            train_last(net, controls["k"].value)
            ax = plot.plot_trainable(net, ax=fig.subplots())
        ax.set_title(f"train_last(net, {controls['k'].value})\n{ax.get_title()}", fontsize="medium")
        _show_figure(output, fig)

    _on_change(draw, controls["k"])
    draw()
    return Explorer(controls, output, rows=[("k",)])
