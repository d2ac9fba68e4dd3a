"""`Net`: the one small interface every d2lft model answers.

A pretrained classifier is a *backbone* (images to a feature vector) followed by a *head*
(features to outputs). Freezing, layer-wise learning rates and feature caching only need to
know where the head is and which blocks the backbone is made of, so they work on any `Net`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["Net", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Net(nn.Module):
    """A backbone, a head, and what travels with the pretrained weights.

    Args:
        backbone: maps images ``(B, 3, H, W)`` to pooled features ``(B, num_features)``.
        head: maps features to outputs (logits, or one value for regression).
        blocks: the names of the backbone's children from input to output; freezing by depth
            and layer-wise learning-rate decay count these.
        num_features: width of the feature vector.
        name: the model's name in `d2lft.create_model`.
        mean, std, image_size: the preprocessing the weights were trained with.
        categories: class names of the current head (ImageNet names for the original head).
        meta: plain facts about the weights, e.g. ``{"imagenet_top1": 75.1, "source": ...,
            "license": ..., "crop_fraction": 0.875}`` (`transforms` reads ``crop_fraction``).

    Example:
        >>> backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> net = Net(backbone, nn.Linear(8, 2), blocks=["0"], num_features=8, name="tiny")
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        blocks: Sequence[str],
        num_features: int,
        name: str,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        image_size: int = 224,
        categories: Sequence[str] | None = None,
        meta: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.block_names = list(blocks)
        self.num_features = num_features
        self.name = name
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.image_size = image_size
        self.categories = list(categories) if categories is not None else None
        self.meta = dict(meta or {})
        missing = [b for b in self.block_names if not hasattr(backbone, b)]
        if missing:
            raise ValueError(f"Net {name!r}: the backbone has no child named {missing}")

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The backbone's blocks from input to output, as ``(name, module)`` pairs."""
        return [(f"backbone.{b}", getattr(self.backbone, b)) for b in self.block_names]

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

    def transforms(self, *, image_size: int | None = None, crop_fraction: float | None = None):
        """Evaluation preprocessing for these weights (works on PIL images and uint8 tensors).

        The shorter side is resized to ``image_size / crop_fraction`` and the centre cropped:
        the weights' own fraction (``meta["crop_fraction"]``, else 0.875, the ImageNet
        convention) trims the borders; 1.0 keeps the whole centre square.

        >>> backbone = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> Net(backbone, nn.Linear(3, 2), blocks=[], num_features=3, name="t").transforms(image_size=64)
        Compose(...)
        """
        from torchvision.transforms import v2

        size = image_size or self.image_size
        if crop_fraction is None:
            crop_fraction = self.meta.get("crop_fraction", 0.875)
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction={crop_fraction!r}: expected a fraction in (0, 1]")
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(round(size / crop_fraction), antialias=True),
                v2.CenterCrop(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_features={self.num_features}, blocks={len(self.block_names)}"
