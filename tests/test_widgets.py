"""Tests for d2lft.widgets: explorers build with a figure, redraw when a control changes, leave no trace."""
from __future__ import annotations

import base64

import ipywidgets
import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image
from torch import nn

from d2lft import widgets
from d2lft.net import Net, Preprocessing

IMAGENET = Preprocessing()


@pytest.fixture(autouse=True)
def no_global_side_effects():
    """Explorers open no pyplot figure and keep rcParams as they were."""
    matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    figures = plt.get_fignums()
    yield
    assert plt.get_fignums() == figures, "an explorer left a pyplot figure open"
    assert dict(matplotlib.rcParams) == rc


def png(explorer: widgets.Explorer) -> bytes:
    """The explorer's one displayed output, which must be a PNG."""
    outputs = explorer.output.outputs
    assert len(outputs) == 1 and outputs[0]["output_type"] == "display_data"
    data = base64.b64decode(outputs[0]["data"]["image/png"])
    assert data.startswith(b"\x89PNG")
    return data


def photos(n: int = 2) -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray(torch.randint(0, 256, (40 + 5 * i, 50, 3), generator=g, dtype=torch.uint8).numpy())
            for i in range(n)]


def test_explorer_is_a_widget_whose_bundle_carries_the_figure():
    explorer = widgets.schedule_explorer(epochs=3, steps_per_epoch=4)
    assert isinstance(explorer, ipywidgets.VBox)
    assert explorer.output in explorer.children
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == png(explorer)


# ----------------------------------------------------------------------------- schedules


def test_schedule_explorer_redraws_on_each_control():
    explorer = widgets.schedule_explorer(epochs=6, steps_per_epoch=5, lr=0.01)
    seen = {png(explorer)}
    for name, value in [("schedule", "step"), ("gamma", 0.5), ("step_epochs", 1), ("compare", True),
                        ("schedule", "onecycle"), ("warmup_epochs", 2.5)]:
        explorer.controls[name].value = value
        image = png(explorer)
        assert image not in seen, f"changing {name} did not change the figure"
        seen.add(image)


def test_schedule_explorer_disables_knobs_a_schedule_ignores():
    explorer = widgets.schedule_explorer(epochs=4, steps_per_epoch=2)
    c = explorer.controls
    c["schedule"].value = "cosine"
    assert c["warmup_epochs"].disabled and c["gamma"].disabled and c["step_epochs"].disabled
    c["schedule"].value = "warmup_cosine"
    assert not c["warmup_epochs"].disabled and c["gamma"].disabled


def test_schedule_explorer_shows_the_schedulers_error():
    explorer = widgets.schedule_explorer(epochs=4, steps_per_epoch=2)
    explorer.controls["schedule"].value = "onecycle"
    explorer.controls["warmup_epochs"].value = 0.0
    (output,) = explorer.output.outputs
    assert output["output_type"] == "stream" and "warmup_epochs > 0" in output["text"]
    explorer.controls["warmup_epochs"].value = 1.0
    png(explorer)  # back to a figure


def test_schedule_explorer_validates_arguments():
    with pytest.raises(ValueError, match="steps_per_epoch must be an int >= 1"):
        widgets.schedule_explorer(steps_per_epoch=0)


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_explorer_presets_sliders_and_resampling():
    images = photos()
    rng = torch.get_rng_state()
    explorer = widgets.augmentation_explorer(images, IMAGENET, image_size=32, versions=3)
    c = explorer.controls
    first = png(explorer)
    assert "RandomResizedCrop" in c["pipeline"].value
    c["preset"].value = "none"
    none = png(explorer)
    assert none != first and "CenterCrop" in c["pipeline"].value
    c["rotation"].value = 30  # a slider switches to the custom pipeline
    assert c["preset"].value == "custom" and "RandomRotation" in c["pipeline"].value
    rotated = png(explorer)
    assert rotated not in (first, none)
    c["color"].value = 0.5
    assert "ColorJitter" in c["pipeline"].value and png(explorer) != rotated
    before = png(explorer)
    c["resample"].click()
    assert png(explorer) != before
    assert torch.equal(torch.get_rng_state(), rng), "the explorer changed the global torch RNG"


def test_augmentation_explorer_is_reproducible_with_a_seed(tiny_folder):
    paths = sorted((tiny_folder / "train" / "a").glob("*.jpg"))
    a = widgets.augmentation_explorer(paths, IMAGENET, image_size=24, versions=2, seed=3)
    b = widgets.augmentation_explorer(paths, IMAGENET, image_size=24, versions=2, seed=3)
    assert png(a) == png(b)
    batch = torch.randint(0, 256, (2, 3, 30, 30), dtype=torch.uint8)
    png(widgets.augmentation_explorer(batch, IMAGENET, image_size=24, versions=2))


def test_augmentation_explorer_rejects_normalized_images():
    with pytest.raises(ValueError, match="not normalized"):
        widgets.augmentation_explorer([torch.randn(3, 20, 20) * 3], IMAGENET, image_size=16)
    with pytest.raises(ValueError, match="no images"):
        widgets.augmentation_explorer([], IMAGENET, image_size=16)


# ----------------------------------------------------------------------------- freezing


def toy_net() -> Net:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())
    return Net(backbone, nn.Linear(8, 2), blocks=["0", "1", "2"], num_features=8, name="toy")


def test_freeze_explorer_redraws_and_leaves_the_net_as_it_was():
    net = toy_net()
    net.backbone[0].requires_grad_(False)  # the user's own choice, which must survive
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    flags = [p.requires_grad for p in net.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in net.parameters()]

    explorer = widgets.freeze_explorer(net, k=1)
    seen = {png(explorer)}
    for k in (0, 3, 2):
        explorer.controls["k"].value = k
        assert png(explorer) not in seen
        seen.add(png(explorer))

    assert [p.requires_grad for p in net.parameters()] == flags
    for p, g in zip(net.parameters(), grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))


def test_freeze_explorer_validates_k():
    with pytest.raises(ValueError, match="from 0 to 3"):
        widgets.freeze_explorer(toy_net(), k=4)
