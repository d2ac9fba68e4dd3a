"""Direct application: what a pretrained classifier says about a few images."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from d2lft.errors import ConfigError
from d2lft.images import BadImageError, load_image
from d2lft.loop import Runner, eval_outputs
from d2lft.net import Net

__all__ = ["classify", "export"]


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

    By default the model sees the whole centre square of each photo (``crop_fraction=1.0``): a
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
    (logits, _), = eval_outputs(net, [torch.stack(tensors)], runner=Runner.for_net(net))
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
