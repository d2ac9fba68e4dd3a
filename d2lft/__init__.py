"""d2lft: fine-tune pretrained vision models with PyTorch (the package behind the d2lft course)."""
from d2lft.net import IMAGENET_MEAN, IMAGENET_STD, Net

__version__ = "0.1.0"

__all__ = ["Net", "IMAGENET_MEAN", "IMAGENET_STD"]
