"""`Net`: the one small interface every d2lft model answers, and the preprocessing it travels with.

A pretrained classifier is a *backbone* (images to a feature vector) followed by a *head*
(features to outputs). Freezing, layer-wise learning rates and feature caching only need to
know where the head is and which blocks the backbone is made of, so they work on any `Net`.

Pretrained weights only work on images prepared the way they were trained on: the same mean and
standard deviation, size and crop. That description is a `Preprocessing`, and every `Net` carries
one (like torchvision's ``weights.transforms()`` or timm's ``pretrained_cfg``), so the data
pipeline asks the model instead of guessing: ``ft.image_folders(root, net)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from d2lft.errors import ConfigError

__all__ = ["Net", "Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a set of weights: normalisation, size, crop, interpolation.

    The evaluation crop is the one rule every d2lft pipeline uses: resize the shorter side to
    ``round(image_size / crop_fraction)``, then take the centre ``image_size`` square. 0.875 is
    the ImageNet convention (it trims the borders); 1.0 keeps the whole centre square.

    >>> p = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, image_size=224)
    >>> p.resize_size(), p.with_size(128).resize_size()
    (256, 146)
    >>> p.eval_transform()(torch.zeros(3, 300, 400, dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_size: int = 224
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"Preprocessing: mean and std need 3 values each (std > 0), got {self.mean}, {self.std}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or not 8 <= self.image_size <= 4096:
            raise ConfigError(f"image_size={self.image_size!r}: expected an int from 8 to 4096 pixels (e.g. 160 or 224)")
        if not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"crop_fraction={self.crop_fraction!r}: expected a fraction in (0, 1]")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation={self.interpolation!r}: expected one of {INTERPOLATIONS}")

    def with_size(self, image_size: int | None = None, *, crop_fraction: float | None = None) -> Preprocessing:
        """The same preprocessing at another size (or crop); None keeps the current value."""
        return dataclasses.replace(
            self,
            image_size=self.image_size if image_size is None else image_size,
            crop_fraction=self.crop_fraction if crop_fraction is None else crop_fraction,
        )

    def resize_size(self) -> int:
        """The shorter side before the centre crop."""
        return round(self.image_size / self.crop_fraction)

    def same_normalization(self, other: Preprocessing) -> bool:
        """True when `other` scales pixels the same way (mean and std within 1e-6)."""
        close = all(abs(a - b) < 1e-6 for a, b in zip(self.mean + self.std, other.mean + other.std))
        return close

    def normalize(self) -> list:
        """uint8 or PIL image -> float tensor normalised with this mean and std."""
        from torchvision.transforms import v2

        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std)),
                v2.ToPureTensor()]

    def eval_transform(self):
        """Resize, centre crop, normalise: evaluation preprocessing for PIL images or uint8 tensors."""
        from torchvision.transforms import v2

        return v2.Compose([v2.Resize(self.resize_size(), interpolation=self._mode(), antialias=True),
                           v2.CenterCrop(self.image_size), *self.normalize()])

    def _mode(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)


class Net(nn.Module):
    """A backbone, a head, and what travels with the pretrained weights.

    Args:
        backbone: maps images ``(B, 3, H, W)`` to pooled features ``(B, num_features)``.
        head: maps features to outputs (logits, or one value for regression).
        blocks: the names of the backbone's children from input to output; freezing by depth
            and layer-wise learning-rate decay count these.
        num_features: width of the feature vector.
        name: the model's name in `d2lft.create_model`.
        preprocessing: how images must be prepared for these weights (default: ImageNet's
            mean and std at 224 px).
        categories: class names of the current head (ImageNet names for the original head).
        meta: facts about the weights (published ImageNet top-1, source, licence ...).

    A net loaded from a ``d2lft finetune`` run (`d2lft.load_finetuned`) also carries ``tta``: the
    test-time augmentation that run chose (`d2lft.TTA`'s options), which `d2lft.classify`
    applies; None (the default) for one view.

    Example:
        >>> backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> net = Net(backbone, nn.Linear(8, 2), blocks=["0"], num_features=8, name="tiny")
        >>> net(torch.zeros(1, 3, 32, 32)).shape, net.preprocessing.image_size
        (torch.Size([1, 2]), 224)
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        blocks: Sequence[str],
        num_features: int,
        name: str,
        preprocessing: Preprocessing | None = None,
        categories: Sequence[str] | None = None,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.block_names = list(blocks)
        self.num_features = num_features
        self.name = name
        self.preprocessing = preprocessing if preprocessing is not None else Preprocessing()
        self.categories = list(categories) if categories is not None else None
        self.meta = dict(meta or {})
        self.tta: dict[str, bool] | None = None
        missing = [b for b in self.block_names if not hasattr(backbone, b)]
        if missing:
            raise ConfigError(f"Net {name!r}: the backbone has no child named {missing}")

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The backbone's blocks from input to output, as ``(name, module)`` pairs."""
        return [(f"backbone.{b}", getattr(self.backbone, b)) for b in self.block_names]

    def parts(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Every parameter once, split into the blocks, ``"backbone.other"`` and ``"head"``.

        From input to output: one entry per block, then ``"backbone.other"`` (backbone
        parameters outside the listed blocks; left out when there are none), then the head.
        Freezing by depth, parameter groups, summaries and plots all count with this split.

        >>> backbone = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> net = Net(backbone, nn.Linear(4, 2), blocks=["1"], num_features=4, name="toy")
        >>> [(name, sum(p.numel() for p in ps)) for name, ps in net.parts()]
        [('backbone.1', 20), ('backbone.other', 20), ('head', 10)]
        """
        seen: set[int] = set()

        def claim(module: nn.Module) -> list[nn.Parameter]:
            params = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            return params

        head = claim(self.head)
        blocks = [(name, claim(block)) for name, block in self.blocks()]
        other = claim(self.backbone)
        return blocks + ([("backbone.other", other)] if other else []) + [("head", head)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, shape ``(B, num_features)``."""
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Outputs computed from features (what a linear probe trains)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def num_outputs(self) -> int:
        """Width of the head's output."""
        last = [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]
        return last.out_features

    @property
    def mean(self) -> tuple[float, ...]:
        """The normalisation mean of the weights (``preprocessing.mean``)."""
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        """The normalisation standard deviation of the weights (``preprocessing.std``)."""
        return self.preprocessing.std

    @property
    def image_size(self) -> int:
        """The input size the weights were trained at (``preprocessing.image_size``)."""
        return self.preprocessing.image_size

    def transforms(self, *, image_size: int | None = None, crop_fraction: float | None = None):
        """Evaluation preprocessing for these weights (PIL images or uint8 tensors), optionally resized.

        >>> backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> Net(backbone, nn.Linear(3, 2), blocks=[], num_features=3, name="t").transforms(image_size=64)
        Compose(...)
        """
        return self.preprocessing.with_size(image_size, crop_fraction=crop_fraction).eval_transform()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}, blocks={len(self.block_names)}"
