"""Direct application: what a pretrained classifier says about a few images; test-time augmentation."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from d2lft.errors import ConfigError
from d2lft.images import BadImageError, load_image
from d2lft.loop import Runner, eval_outputs
from d2lft.net import Net

__all__ = ["classify", "export", "TTA", "as_it_predicts"]


@torch.no_grad()
def classify(
    net: Net,
    images: Sequence[str | Path | Image.Image],
    *,
    topk: int = 5,
    crop_fraction: float = 1.0,
    return_errors: bool = False,
) -> list[list[tuple[str, float]]] | list[list[tuple[str, float]] | Exception]:
    """Top-``topk`` ``(class name, probability)`` pairs for each image, with the net's own preprocessing.

    A file that cannot be used raises `BadImageError` (``FileNotFoundError`` when missing), unless
    ``return_errors=True``: then that error takes the file's place in the list and the other images are
    still classified (as ``asyncio.gather(..., return_exceptions=True)`` does), which is what
    ``d2lft predict good.jpg empty.jpg`` needs to report the bad file and go on.

    A net that carries ``tta`` (loaded from a run that chose test-time augmentation) averages
    its views (`TTA`). By default the model sees the whole centre square of each photo (``crop_fraction=1.0``): a
    photo given for prediction is framed by a person, so its borders are kept; 0.875 is the
    standard evaluation crop (see `Net.transforms`).

    >>> from matplotlib.cbook import get_sample_data
    >>> from d2lft.models import create_model
    >>> photo = get_sample_data("grace_hopper.jpg", asfileobj=False)
    >>> classify(create_model("efficientnet_lite0"), [photo], topk=1)[0][0][0]
    'military uniform'
    """
    if net.categories is None:
        raise ConfigError(f"{net.name}: the head has no class names (it was replaced); pass a net with its own head")
    if not images:
        raise ConfigError("classify: no images given")
    topk = min(topk, len(net.categories))
    preprocess = net.transforms(crop_fraction=crop_fraction)
    results: list = []
    tensors = []
    for img in images:
        try:
            tensors.append(preprocess(img if isinstance(img, Image.Image) else load_image(img)))
            results.append(None)  # filled in below
        except (BadImageError, FileNotFoundError) as err:
            if not return_errors:
                raise
            results.append(err)
    if not tensors:
        return results
    (logits, _), = eval_outputs(as_it_predicts(net), [torch.stack(tensors)], runner=Runner.for_net(net))
    probs = logits.float().softmax(dim=1).cpu()
    values, indices = probs.topk(topk, dim=1)
    labels = iter(
        [(net.categories[i], float(v)) for v, i in zip(row_v.tolist(), row_i.tolist())]
        for row_v, row_i in zip(values, indices)
    )
    return [next(labels) if result is None else result for result in results]


def export(net: Net, path: str | Path) -> Path:
    """Save `net` with ``torch.export`` (eval mode, CPU, a batch of one image at its size), loadable with
    ``torch.export.load(path).module()`` and PyTorch alone.

    The file holds the network only: feed it images prepared with ``net.transforms()``. Its class
    names and preprocessing travel in the file too, as ``extra_files["d2lft.json"]``.

    >>> import tempfile
    >>> from d2lft.models import create_model
    >>> net = create_model("efficientnet_lite0", num_classes=2)
    >>> path = export(net, Path(tempfile.mkdtemp()) / "net.pt2")
    >>> x = torch.randn(1, 3, 224, 224)
    >>> torch.allclose(torch.export.load(path).module()(x), net.eval()(x), atol=1e-4)
    True
    """
    import dataclasses
    import json

    path = Path(path)
    net = net.cpu().eval()
    example = torch.zeros(1, 3, net.image_size, net.image_size)
    program = torch.export.export(net, (example,))
    meta = {"categories": net.categories, "preprocessing": dataclasses.asdict(net.preprocessing), "name": net.name}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={"d2lft.json": json.dumps(meta)})
    return path


class TTA(nn.Module):
    """`net` with test-time augmentation: the class probabilities averaged over flipped (and cropped) views.

    The views of a batch are the images and, with `flip`, their mirror images; with
    `crop_fraction`, also the four corner crops and the centre crop of that fraction of the side,
    each resized back to the input size (and flipped too); with `rotate`, every view also turned
    by 90, 180 and 270 degrees (for images with no up, such as satellite tiles: with `flip`, the
    8 symmetries of the square, which the "overhead" augmentation trains for). ``forward`` returns the log of the
    averaged probabilities: valid logits, so the wrapper goes wherever a net goes, and
    ``ft.predict(TTA(net), loader)`` gives the averaged probabilities, ``ft.evaluate(TTA(net),
    loader)`` their accuracy and log-loss. Each view costs one forward pass. TTA can turn right
    predictions wrong as well as wrong ones right (Shanmugam et al., 2021): count both with
    `d2lft.metrics.prediction_changes`.

    >>> net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> x = torch.randn(4, 3, 16, 16)
    >>> tta = TTA(net)
    >>> mean = (net(x).softmax(1) + net(x.flip(-1)).softmax(1)) / 2
    >>> torch.allclose(tta(x).exp(), mean, atol=1e-6), len(TTA(net, crop_fraction=0.8).views(x))
    (True, 12)
    >>> len(TTA(net, rotate=True).views(x)), TTA(net, rotate=True).num_views, TTA(net, crop_fraction=0.8).num_views
    (8, 8, 12)
    """

    def __init__(self, net: nn.Module, *, flip: bool = True, rotate: bool = False,
                 crop_fraction: float | None = None) -> None:
        super().__init__()
        if crop_fraction is not None and not (isinstance(crop_fraction, (int, float)) and 0 < crop_fraction < 1):
            raise ConfigError(f"TTA: crop_fraction must be None (no crops) or a fraction in (0, 1) such as 0.875, "
                              f"got {crop_fraction!r}")
        self.net = net
        self.flip = bool(flip)
        self.rotate = bool(rotate)
        self.crop_fraction = crop_fraction

    @property
    def num_views(self) -> int:
        """Forward passes per image: ``len(self.views(x))``."""
        return (6 if self.crop_fraction is not None else 1) * (2 if self.flip else 1) * (4 if self.rotate else 1)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The augmented copies of a batch ``(B, C, H, W)``, the batch itself first."""
        views = [x]
        if self.crop_fraction is not None:
            h, w = x.shape[-2:]
            size = [max(1, round(h * self.crop_fraction)), max(1, round(w * self.crop_fraction))]
            views += [TF.resize(crop, [h, w], antialias=True) for crop in TF.five_crop(x, size)]
        if self.flip:
            views += [v.flip(-1) for v in views]
        if self.rotate:
            views += [torch.rot90(v, k, dims=(-2, -1)) for k in (1, 2, 3) for v in views]
        return views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([self.net(v).float().log_softmax(1) for v in self.views(x)])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(log_probs))  # log of the mean probability


def as_it_predicts(net: nn.Module) -> nn.Module:
    """`net` wrapped in the test-time augmentation its run chose (``net.tta``, see `Net`), else `net` itself."""
    tta = getattr(net, "tta", None)
    return TTA(net, **tta) if tta else net
