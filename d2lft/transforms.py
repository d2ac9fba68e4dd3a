"""Training and evaluation transforms, built from a model's `Preprocessing`.

Evaluation always uses ``preprocessing.eval_transform()`` (one crop rule for every pipeline);
training adds an augmentation preset in front of the same normalisation::

    train_transform(net.preprocessing, "crop+flip")

Presets:

* ``"none"``: the evaluation transform;
* ``"crop+flip"``: ``RandomResizedCrop`` (25-100 % of the area) and a horizontal flip, for photos;
* ``"crop+flip+color"``: plus ``ColorJitter``;
* ``"overhead"``: for images seen from above (satellite, microscopy): a mild random crop,
  flips on both axes and right-angle rotations, no colour change (colour often carries the class).
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from d2lft.errors import ConfigError
from d2lft.net import Preprocessing

__all__ = ["AUGMENT_PRESETS", "train_transform", "eval_transform"]

AUGMENT_PRESETS = ("none", "crop+flip", "crop+flip+color", "overhead")


class _RightAngleRotation(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees, picked uniformly (no interpolation, no borders)."""

    def forward(self, image):
        k = int(torch.randint(4, ()).item())
        return v2.functional.rotate(image, 90 * k) if k else image


def check_augment(augment: str) -> str:
    if augment not in AUGMENT_PRESETS:
        raise ConfigError(f"augment={augment!r} is not a preset; choose one of {AUGMENT_PRESETS}")
    return augment


def train_transform(preprocessing: Preprocessing, augment: str = "crop+flip") -> v2.Compose:
    """Training preprocessing for PIL images or uint8 tensors: an augmentation preset, then normalise.

    >>> p = Preprocessing(image_size=64)
    >>> train_transform(p, "crop+flip")(torch.zeros(3, 80, 80, dtype=torch.uint8)).shape
    torch.Size([3, 64, 64])
    """
    check_augment(augment)
    size = preprocessing.image_size
    if augment == "none":
        return preprocessing.eval_transform()
    if augment == "overhead":
        steps: list = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.9, 1.1), antialias=True),
                       v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), _RightAngleRotation()]
    else:
        steps = [v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        if augment == "crop+flip+color":
            steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
    return v2.Compose(steps + preprocessing.normalize())


def eval_transform(preprocessing: Preprocessing) -> v2.Compose:
    """``preprocessing.eval_transform()``: resize the shorter side, centre crop, normalise.

    >>> eval_transform(Preprocessing(image_size=64))(torch.zeros(3, 100, 80, dtype=torch.uint8)).shape
    torch.Size([3, 64, 64])
    """
    return preprocessing.eval_transform()
