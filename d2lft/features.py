"""Cache a frozen backbone's features, so a linear probe trains on vectors instead of images.

When the backbone is frozen, every epoch of a probe pushes the same images through the same
weights to get the same feature vectors. Computing them once and training the head on the cached
vectors gives the same head, in a fraction of the time::

    train, val = ft.feature_loaders(net, data)
    history = ft.fit(net.head, train, val, epochs=30, lr=3e-3)

or, in one call, ``ft.probe(net, data)``.

Random augmentation does not mix with caching (one random view would be frozen into the cache),
so extract features with the evaluation transform.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from d2lft import distributed
from d2lft.errors import ConfigError
from d2lft.freeze import freeze
from d2lft.loop import Runner, eval_outputs

__all__ = ["extract_features", "feature_loaders", "probe", "domain_shift"]

#: The probe's settings, measured on the cached features of Lite0 (ants/bees and shapes):
#: 30 epochs of AdamW at 3e-3 with a cosine schedule, batches of 64.
PROBE_EPOCHS, PROBE_LR, PROBE_BATCH = 30, 3e-3, 64


@torch.no_grad()
def extract_features(
    net: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TensorDataset:
    """``TensorDataset(features, targets)`` of `net`'s backbone over `loader`, on the CPU.

    `net` is a `d2lft.Net` (anything with ``forward_features``). The backbone runs in eval mode
    (BatchNorm uses its running statistics, dropout is off) without gradients, on `device`
    (default: where the net's weights are); layer modes are put back afterwards. A loader that
    yields images only gives a dataset of features only.

    >>> from d2lft.net import Net
    >>> backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> net = Net(backbone, nn.Linear(4, 2), blocks=["0"], num_features=4, name="tiny")
    >>> images = TensorDataset(torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 1]))
    >>> feats = extract_features(net, DataLoader(images, batch_size=2), progress=False)
    >>> feats.tensors[0].shape, feats.tensors[1].tolist()
    (torch.Size([5, 4]), [0, 1, 0, 1, 1])
    """
    if not hasattr(net, "forward_features"):
        raise TypeError(f"extract_features: expected a d2lft.Net (with forward_features), got {type(net).__name__}; "
                        "make one with d2lft.create_model")
    runner = Runner.for_net(net, device)
    net.to(runner.device)
    total = len(loader) if hasattr(loader, "__len__") else None
    shown = progress and distributed.is_main_process()  # torchrun: rank 0 shows progress
    features, targets = [], []
    for out, y in tqdm(eval_outputs(net, loader, runner=runner, fn=net.forward_features), total=total,
                       desc="features", unit="batch", disable=None if shown else True):
        features.append(out.float().cpu())
        if y is not None:
            targets.append(y.cpu())
    if not features:
        raise ConfigError("extract_features: the loader yielded no batches; check its dataset (an empty folder?)")
    tensors = [torch.cat(features)] + ([torch.cat(targets)] if targets else [])
    # torchrun: each process computed its share; every process gets all of them, in the loader's order.
    return TensorDataset(*[distributed.gather_eval_shards(t) for t in tensors])


def feature_loaders(
    net: nn.Module,
    data: Any,
    *,
    batch_size: int = PROBE_BATCH,
    seed: int = 0,
    transform=None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """DataLoaders over the cached features of `data` (an `ImageFolderData`): train shuffled, val in order.

    The training images are read with the evaluation transform (``data.loader("train")``): one
    random crop frozen into the cache would be worse than none; `transform` reads both splits
    through another pipeline instead. Shuffling is seeded by `seed`.

    >>> from d2lft.net import Net, Preprocessing
    >>> from d2lft.data import image_folders
    >>> from d2lft.synthetic import make_shapes
    >>> import tempfile
    >>> data = image_folders(make_shapes(tempfile.mkdtemp(), train_per_class=2, val_per_class=1),
    ...                      Preprocessing(image_size=16), progress=False)
    >>> net = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(3, 5), blocks=[],
    ...           num_features=3, name="pool")
    >>> train, val = feature_loaders(net, data, progress=False)
    >>> next(iter(train))[0].shape, len(val.dataset)
    (torch.Size([10, 3]), 5)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"feature_loaders: batch_size must be an int >= 1, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(extract_features(net, data.loader("train", transform=transform), device=device,
                                        progress=progress), batch_size=batch_size, shuffle=True, generator=generator)
    val_images = data.val if transform is None else data.loader("val", transform=transform)
    val = DataLoader(extract_features(net, val_images, device=device, progress=progress), batch_size=256)
    return train, val


def probe(net: nn.Module, data: Any, *, epochs: int = PROBE_EPOCHS, lr: float = PROBE_LR,
          weight_decay: float = 1e-4, seed: int = 0, device: str | torch.device | None = None,
          progress: bool = False, loaders: tuple[DataLoader, DataLoader] | None = None, **fit_options: Any):
    """A linear probe: freeze the backbone, cache its features once, train only ``net.head`` on them.

    Returns fit's `History`. Pass `loaders` (from `feature_loaders`) to reuse a cache for several
    probes; other keyword arguments go to `d2lft.fit` (e.g. ``best=None``).
    """
    from d2lft.train import fit

    freeze(net.backbone)
    task = "classification" if getattr(data, "target", "class") == "class" else "regression"
    train, val = loaders if loaders is not None else feature_loaders(net, data, seed=seed, device=device,
                                                                     progress=progress)
    fit_options.setdefault("scheduler", "cosine")
    return fit(net.head, train, val, epochs=epochs, lr=lr, weight_decay=weight_decay, device=device,
               progress=False, seed=seed, task=task, **fit_options)


@torch.no_grad()
def domain_shift(net: nn.Module, data: Any, *, images: int = 128, image_size: int | None = None,
                 device: str | torch.device | None = None) -> float:
    """How far `data`'s training images are from the images the backbone was pretrained on.

    Every BatchNorm layer of ``net.backbone`` remembers the mean and variance of its inputs on
    the pretraining data (its running statistics). We push `images` training images, spread
    evenly over the (class-sorted) training set, through the backbone in eval mode and return,
    averaged over the layers, the mean over channels of ``|new mean - running mean| / running
    std``: 0 for images exactly like the pretraining data. The images are shown at
    `image_size` (default: the size the weights were trained at, ``net.preprocessing``), so the
    figure describes the images, not the size you train at: small images look further away
    (Lite0, ants and bees shown at 96/128/160/224 px: 0.24/0.19/0.17/0.15). For Lite0
    (ImageNet) at 224 px we measured 0.15 on ants and bees (ImageNet-like photos; 0.18 from
    images cached at 128 px), 0.29 on EuroSAT satellite tiles and 0.26 on the generated shapes.
    Cost: one forward pass over `images` images.

    >>> from d2lft.net import Net, Preprocessing
    >>> from d2lft.data import image_folders
    >>> from d2lft.synthetic import make_shapes
    >>> import tempfile
    >>> data = image_folders(make_shapes(tempfile.mkdtemp(), train_per_class=2, val_per_class=1),
    ...                      Preprocessing(image_size=16), progress=False)
    >>> backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> net = Net(backbone, nn.Linear(4, 5), blocks=[], num_features=4, name="tiny")
    >>> domain_shift(net, data) > 0
    True
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.utils.data import Subset

    layers = [m for m in getattr(net, "backbone", net).modules()
              if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]
    if not layers:
        raise ConfigError(f"domain_shift: {type(net).__name__} has no BatchNorm layers with running statistics "
                          "to compare with")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError(f"domain_shift: images must be an int >= 1, got {images!r}")
    size = image_size or getattr(getattr(net, "preprocessing", None), "image_size", None)
    if size is not None and size != data.preprocessing.image_size:
        data = data.resized(size)
    loader = data.loader("train")
    n = len(loader.dataset)
    picked = Subset(loader.dataset, sorted({int(i * n / min(images, n)) for i in range(min(images, n))}))
    sums: dict[nn.Module, list] = {m: [0.0, 0] for m in layers}

    def record(module, inputs, output):
        x = inputs[0].float()
        dims = [d for d in range(x.ndim) if d != 1]
        sums[module][0] = sums[module][0] + x.sum(dims).cpu()
        sums[module][1] += x.numel() // x.shape[1]

    hooks = [m.register_forward_hook(record) for m in layers]
    try:
        # float32 even under bf16_evaluation: the statistics are compared with a threshold
        runner = dataclasses.replace(Runner.for_net(net, device), eval_bf16=False)
        net.to(runner.device)
        for _ in eval_outputs(net, DataLoader(picked, batch_size=loader.batch_size), runner=runner,
                              fn=net.forward_features if hasattr(net, "forward_features") else net):
            pass
    finally:
        for h in hooks:
            h.remove()
    distances = [((total / count - m.running_mean.float().cpu()).abs()
                  / (m.running_var.float().cpu() + m.eps).sqrt()).mean().item()
                 for m, (total, count) in sums.items() if count]
    return sum(distances) / len(distances)
