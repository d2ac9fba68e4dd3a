"""Training and evaluation transforms built from a model's Preprocessing."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from d2lft.net import Preprocessing
from d2lft.transforms import AUGMENT_PRESETS, train_transform


# --------------------------------------------------------------------------- transforms


def test_transform_presets():
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    p = Preprocessing(image_size=48)
    for preset in AUGMENT_PRESETS:
        assert train_transform(p, preset)(image).shape == (3, 48, 48)
    assert torch.equal(train_transform(p, "none")(image), p.eval_transform()(image))
    torch.manual_seed(0)
    assert not torch.equal(train_transform(p, "crop+flip")(image), train_transform(p, "crop+flip")(image))
    with pytest.raises(ValueError, match="crop\\+flip\\+color"):
        train_transform(p, "flip")


def test_transforms_accept_pil_images():
    image = Image.new("RGB", (90, 70), (255, 0, 0))
    x = Preprocessing(mean=(0, 0, 0), std=(1, 1, 1), image_size=48).eval_transform()(image)
    assert x.shape == (3, 48, 48) and torch.allclose(x[0], torch.ones(48, 48))


def test_overhead_preset_keeps_colours_and_turns_by_right_angles():
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    image[0, :32] = 255  # red top half, blue bottom half: a rotation or flip moves it, colour stays
    image[2, 32:] = 255
    p = Preprocessing(mean=(0, 0, 0), std=(1, 1, 1), image_size=64, crop_fraction=1.0)
    torch.manual_seed(0)
    outs = [train_transform(p, "overhead")(image) for _ in range(40)]
    colours = {tuple(x[:, 32, 32].round().tolist()) for x in outs} | {tuple(x[:, 2, 2].round().tolist()) for x in outs}
    assert colours <= {(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0)}  # no hue or brightness change
    red_side = {("top" if x[0, :8].mean() > 0.9 else "bottom" if x[0, -8:].mean() > 0.9 else
                 "left" if x[0, :, :8].mean() > 0.9 else "right") for x in outs}
    assert red_side == {"top", "bottom", "left", "right"}  # flips and 90-degree turns, every side seen


def test_preprocessing_is_validated():
    with pytest.raises(ValueError, match="image_size=100000"):
        Preprocessing(image_size=100000)
    with pytest.raises(ValueError, match="crop_fraction"):
        Preprocessing(crop_fraction=1.5)
