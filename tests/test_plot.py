"""Tests for d2lft.plot: what each function draws, and that global matplotlib state is untouched."""
from __future__ import annotations

import dataclasses

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from d2lft import plot
from d2lft.net import IMAGENET_MEAN, IMAGENET_STD, Net

HISTORY = {
    "epoch": [1, 2, 3, 4],
    "train_loss": [1.0, 0.7, 0.5, 0.4],
    "train_acc": [0.5, 0.7, 0.8, 0.85],
    "val_loss": [0.9, 0.6, 0.55, 0.6],
    "val_acc": [0.6, 0.75, 0.8, 0.78],
    "val_mae": [],
    "lr": [1e-3, 8e-4, 4e-4, 1e-4],
    "seconds": [2.0, 1.9, 1.9, 2.1],
    "images_per_second": [120.0, 125.0, 126.0, 119.0],
    "best_epoch": 3,
}


@pytest.fixture(autouse=True)
def untouched_matplotlib():
    """Every test: rcParams are the same afterwards; close the figures the test made."""
    matplotlib.get_backend()  # resolve the backend first: that alone fills rcParams["backend"]
    before = dict(matplotlib.rcParams)
    yield
    after = dict(matplotlib.rcParams)
    changed = {k for k in before if before[k] != after[k]}
    plt.close("all")
    assert not changed, f"rcParams changed: {sorted(changed)}"


def tiny_net() -> Net:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Net(backbone, nn.Linear(4, 2), blocks=["0", "1"], num_features=4, name="tiny")


# ----------------------------------------------------------------------------- history


def test_plot_history_two_metrics_draw_train_val_and_best():
    axes = plot.plot_history(HISTORY)
    assert isinstance(axes, np.ndarray) and axes.shape == (2,)
    loss, acc = axes
    assert [line.get_label() for line in loss.lines] == ["train", "val", "best (epoch 3)"]
    np.testing.assert_allclose(loss.lines[0].get_xdata(), HISTORY["epoch"])
    np.testing.assert_allclose(loss.lines[1].get_ydata(), HISTORY["val_loss"])
    np.testing.assert_allclose(acc.lines[0].get_ydata(), HISTORY["train_acc"])
    assert loss.lines[2].get_xdata()[0] == 3
    assert acc.get_ylabel() == "accuracy"
    assert axes[0].figure is axes[1].figure


def test_plot_history_single_metric_returns_axes_and_uses_given_ax():
    fig, ax = plt.subplots()
    fignums = plt.get_fignums()
    out = plot.plot_history(HISTORY, metrics="lr", ax=ax, best=False)
    assert out is ax and plt.get_fignums() == fignums  # drew on ours, made no figure
    assert len(ax.lines) == 1
    np.testing.assert_allclose(ax.lines[0].get_ydata(), HISTORY["lr"])


def test_plot_history_accepts_dataclass_and_to_dict_objects():
    @dataclasses.dataclass
    class Hist:
        epoch: list
        train_loss: list
        val_loss: list
        best_epoch: int | None = None

    h = Hist(epoch=[1, 2], train_loss=[1.0, 0.5], val_loss=[0.9, 0.8])
    ax = plot.plot_history(h, metrics="loss")
    assert len(ax.lines) == 2  # no best_epoch, no marker

    class WithToDict:
        def to_dict(self):
            return HISTORY

    axes = plot.plot_history(WithToDict(), metrics=("loss", "acc", "seconds"))
    assert len(axes) == 3
    assert len(axes[2].lines) == 2  # seconds + best marker


def test_plot_history_with_real_history():
    from d2lft import train

    h = train.History()
    for epoch, (tl, vl) in enumerate([(1.0, 0.9), (0.6, 0.7)], start=1):
        h.epoch.append(epoch)
        h.train_loss.append(tl)
        h.val_loss.append(vl)
        h.train_acc.append(0.5)
        h.val_acc.append(0.6)
    ax = plot.plot_history(h, metrics="loss", best=False)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.9, 0.7])


def test_plot_history_regression_defaults_to_mae_and_skips_missing_train():
    h = {"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [0.9, 0.8], "train_acc": [None, None],
         "val_acc": [], "val_mae": [0.3, 0.2], "best_epoch": None}
    loss, mae = plot.plot_history(h)
    assert mae.get_ylabel() == "mean absolute error"
    assert [line.get_label() for line in mae.lines] == ["val"]


def test_plot_history_missing_values_become_gaps():
    h = {"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.4], "val_loss": [0.9, None, 0.7]}
    ax = plot.plot_history(h, metrics="loss")
    assert np.isnan(ax.lines[1].get_ydata()[1])


def test_plot_history_errors_name_the_problem():
    with pytest.raises(ValueError, match="no values for metric 'f1'"):
        plot.plot_history(HISTORY, metrics=("loss", "f1"))
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="1 Axes for 2 metrics"):
        plot.plot_history(HISTORY, ax=ax)
    with pytest.raises(TypeError, match="History"):
        plot.plot_history([1, 2, 3])


# ----------------------------------------------------------------------------- lr finder, schedules


def test_plot_lr_find_log_axis_and_suggestion_line():
    from d2lft.optim import LRFindResult

    lrs = list(np.logspace(-5, 0, 30))
    losses = list(np.linspace(2, 1, 30))
    result = LRFindResult(lrs=lrs, losses=losses, suggestion=1e-3, raw_losses=losses)
    ax = plot.plot_lr_find(result)
    assert ax.get_xscale() == "log"
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[0].get_xdata(), lrs)
    assert ax.lines[1].get_xdata()[0] == pytest.approx(1e-3)
    assert len(plot.plot_lr_find(result, raw=True).lines) == 3
    assert len(result.plot().lines) == 2  # the method delegates here
    with pytest.raises(ValueError, match="as many losses as lrs"):
        plot.plot_lr_find({"lrs": [1e-3], "losses": [], "suggestion": None})


def test_plot_schedules_one_line_per_schedule_in_epochs():
    from d2lft.optim import schedule_curve

    curves = {name: schedule_curve(name, epochs=3, steps_per_epoch=4, lr=0.1) for name in ("constant", "cosine")}
    ax = plot.plot_schedules(curves, steps_per_epoch=4)
    assert [line.get_label() for line in ax.lines] == ["constant", "cosine"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), np.arange(12) / 4)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), curves["cosine"])
    assert ax.get_xlabel() == "epoch"
    assert plot.plot_schedules(curves, log=True).get_yscale() == "log"


# ----------------------------------------------------------------------------- images


def _shown(fig) -> list[np.ndarray]:
    return [np.asarray(a.images[0].get_array()) for a in fig.axes if a.images]


def test_show_images_uint8_batch_grid_and_titles():
    batch = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    fig = plot.show_images(batch, ncols=3, titles=list("abcde"))
    assert len(fig.axes) == 6  # 2 rows x 3 columns, the last one hidden
    shown = _shown(fig)
    assert len(shown) == 5
    np.testing.assert_array_equal(shown[4], batch[4].permute(1, 2, 0).numpy())
    assert [a.get_title() for a in fig.axes if a.images] == list("abcde")
    assert not fig.axes[5].get_visible() or not fig.axes[5].axison


def test_show_images_undoes_normalize():
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalized = (pixels - mean) / std
    shown = _shown(plot.show_images(normalized, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    np.testing.assert_allclose(shown[1], pixels[1].permute(1, 2, 0).numpy(), atol=1e-5)
    clipped = _shown(plot.show_images(normalized))  # without mean/std: clipped to [0, 1]
    assert clipped[0].min() >= 0 and clipped[0].max() <= 1


def test_show_images_pil_list_of_sizes_and_grayscale():
    images = [Image.new("RGB", (10, 6), "red"), Image.new("L", (4, 4), 128)]
    shown = _shown(plot.show_images(images))
    assert shown[0].shape == (6, 10, 3) and shown[1].shape == (4, 4, 3)
    gray = _shown(plot.show_images(torch.rand(2, 1, 5, 5)))
    assert gray[0].shape == (5, 5)


def test_show_images_draws_on_given_figure():
    fig = plt.figure()
    assert plot.show_images(torch.zeros(3, 3, 4, 4), fig=fig) is fig
    assert len(fig.axes) == 3


def test_show_images_errors():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        plot.show_images(torch.zeros(2, 5, 4, 4))
    with pytest.raises(ValueError, match="2 titles for 3 images"):
        plot.show_images(torch.zeros(3, 3, 4, 4), titles=["a", "b"])
    with pytest.raises(ValueError, match="no images"):
        plot.show_images([])
    with pytest.raises(TypeError, match="PIL"):
        plot.show_images(["not an image"])


def test_plot_filters_rgb_gray_and_first_conv_of_a_net():
    net = tiny_net()
    fig = plot.plot_filters(net)  # first conv: 4 filters, 3 input channels -> colour
    shown = _shown(fig)
    assert len(shown) == 4 and shown[0].shape == (3, 3, 3)
    assert all(s.min() == pytest.approx(0) and s.max() == pytest.approx(1) for s in shown)
    gray = _shown(plot.plot_filters(net.backbone[1].weight))  # 4 input channels -> grey mean
    assert gray[0].shape == (3, 3)
    assert len(_shown(plot.plot_filters(nn.Conv2d(3, 100, 3), max_filters=10))) == 10
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        plot.plot_filters(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- evaluation


def test_plot_confusion_matrix_annotates_counts():
    ax = plot.plot_confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], classes=["a", "b", "c"])
    assert len(ax.images) == 1
    texts = [int(t.get_text()) for t in ax.texts]
    assert texts == [1, 1, 0, 0, 1, 0, 1, 0, 2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert "66.7%" in ax.get_title()


def test_plot_bars_heights_and_labels():
    values = {"probe": 0.8, "finetune": 0.925, "scratch": 0.55}
    ax = plot.plot_bars(values, ylabel="val accuracy", errors={"probe": 0.01, "finetune": 0.02, "scratch": 0.05})
    assert [float(p.get_height()) for p in ax.patches] == list(values.values())
    assert [t.get_text() for t in ax.texts] == ["0.8", "0.925", "0.55"]
    assert ax.get_ylabel() == "val accuracy"
    with pytest.raises(ValueError, match="no entry for \\['scratch'\\]"):
        plot.plot_bars(values, errors={"probe": 0.1, "finetune": 0.1})


def test_plot_bars_long_names_do_not_overlap():
    values = {"the model's own": 0.92, "ImageNet statistics": 0.91, "0-255, not scaled": 0.73,
              "right in training, 0-255 in evaluation": 0.46}
    ax = plot.plot_bars(values)
    ax.figure.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.get_xticklabels()]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [(b.x0, b.x1) for b in boxes]
    assert ax.get_xticklabels()[3].get_text() == "right in\ntraining,\n0-255 in\nevaluation"


def test_plot_trainable_splits_each_block():
    from d2lft.freeze import train_last

    net = tiny_net()
    train_last(net, 1)
    ax = plot.plot_trainable(net)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["backbone.0", "backbone.1", "head"]
    widths = [float(p.get_width()) for p in ax.patches]
    block0, block1, head = 3 * 4 * 9 + 4, 4 * 4 * 9 + 4, 4 * 2 + 2
    assert widths == [0, block1, head, block0, 0, 0]  # trainable parts, then frozen parts
    assert f"{block1 + head:,} of {block0 + block1 + head:,}" in ax.get_title()
