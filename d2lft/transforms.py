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

MixUp and CutMix mix whole batches (two images and their labels), so they run after the batch
is collated: `mix_collate` is a ``collate_fn`` for a training DataLoader.
"""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch.utils.data import default_collate
from torchvision.transforms import v2

from d2lft.errors import ConfigError
from d2lft.net import Preprocessing

__all__ = ["AUGMENT_PRESETS", "train_transform", "eval_transform", "mix_collate"]

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


class _MixCollate:
    """``collate_fn``: the default collation, then one of MixUp or CutMix on the batch (picklable for workers)."""

    def __init__(self, transform: v2.Transform) -> None:
        self.transform = transform

    def __call__(self, batch: list) -> Any:
        return self.transform(*default_collate(batch))

    def __repr__(self) -> str:
        return f"mix_collate({self.transform})"


def mix_collate(num_classes: int, *, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0) -> _MixCollate:
    """A ``collate_fn`` that mixes each training batch with MixUp or CutMix (one of the two, at random).

    torchvision's ``v2.MixUp`` blends two images, ``v2.CutMix`` pastes a patch of one into the
    other; the mixing weight is drawn from Beta(alpha, alpha) (alpha 0 turns that one off). The
    targets become probabilities ``(B, num_classes)``, which ``nn.CrossEntropyLoss`` (`d2lft.fit`'s
    default, label smoothing included) takes as they are; ``train_acc`` then counts the label
    mass of the predicted class (the mixing weight when it is one of the two). Use it for the
    training loader only::

        train = DataLoader(data.train_dataset, batch_size=32, shuffle=True, drop_last=True,
                           collate_fn=ft.mix_collate(len(data.classes)))
        ft.fit(net, train, data.val, epochs=5)

    >>> collate = mix_collate(3)
    >>> x, y = collate([(torch.rand(3, 8, 8), i % 3) for i in range(4)])
    >>> x.shape, y.shape, torch.allclose(y.sum(1), torch.ones(4))
    (torch.Size([4, 3, 8, 8]), torch.Size([4, 3]), True)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ConfigError(f"mix_collate: num_classes must be an int >= 2 (len(data.classes)), got {num_classes!r}")
    for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < float("inf"):
            raise ConfigError(f"mix_collate: {name} must be a number >= 0 (0 turns it off), got {alpha!r}")
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=int(num_classes)))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=int(num_classes)))
    if not mixes:
        raise ConfigError("mix_collate: mixup_alpha and cutmix_alpha are both 0; set one > 0 or use no collate_fn")
    return _MixCollate(mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes))
