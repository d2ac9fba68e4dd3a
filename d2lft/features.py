"""Cache a frozen backbone's features, so a linear probe trains on vectors instead of images.

When the backbone is frozen, every epoch of a probe pushes the same images through the same
weights to get the same feature vectors. Computing them once and training the head on the cached
vectors gives the same head, in a fraction of the time::

    train, val = ft.feature_loaders(net, data.loader("train", augment=False), data.val)
    history = ft.fit(net.head, train, val, epochs=30, lr=3e-3)

Random augmentation does not mix with caching (one random view would be frozen into the cache),
so extract features with the evaluation transform.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from d2lft import distributed
from d2lft.train import _batch, _module_modes, _net_device, _progress_disabled, _restore_modes

__all__ = ["extract_features", "feature_loaders"]


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
    device = torch.device(device) if device is not None else _net_device(net)
    loader = distributed.shard_eval_loader(loader)  # torchrun: each process computes its share ...
    modes = _module_modes(net)
    net.to(device).eval()
    features, targets = [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    disable = _progress_disabled(progress and distributed.is_main_process())  # torchrun: rank 0 shows progress
    try:
        for batch in tqdm(loader, total=total, desc="features", unit="batch", disable=disable):
            x, y = _batch(batch, device, channels_last=False)
            features.append(net.forward_features(x).float().cpu())
            if y is not None:
                targets.append(y.cpu())
    finally:
        _restore_modes(modes)
    if not features:
        raise ValueError("extract_features: the loader yielded no batches; check its dataset (an empty folder?)")
    tensors = [torch.cat(features)] + ([torch.cat(targets)] if targets else [])
    # ... and then every process gets all of them, in the loader's order.
    return TensorDataset(*[distributed.gather_eval_shards(t) for t in tensors])


def feature_loaders(
    net: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    *,
    batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[DataLoader, DataLoader | None]:
    """DataLoaders over cached features: train shuffled (seeded by `seed`), val in order.

    `batch_size` defaults to the train loader's, so a probe on the cache takes the same steps as
    a probe through the frozen backbone. Pass a train loader *without* random augmentation.

    >>> from d2lft.net import Net
    >>> net = Net(nn.Sequential(nn.Flatten()), nn.Linear(12, 2), blocks=["0"], num_features=12, name="flat")
    >>> images = DataLoader(TensorDataset(torch.randn(6, 3, 2, 2), torch.zeros(6).long()), batch_size=4)
    >>> train, val = feature_loaders(net, images, images, progress=False)
    >>> next(iter(train))[0].shape, len(val.dataset)
    (torch.Size([4, 12]), 6)
    """
    if batch_size is None:
        batch_size = getattr(train_loader, "batch_size", None) or 64
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"feature_loaders: batch_size must be an int >= 1, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(extract_features(net, train_loader, device=device, progress=progress),
                       batch_size=batch_size, shuffle=True, generator=generator)
    if val_loader is None:
        return train, None
    val = DataLoader(extract_features(net, val_loader, device=device, progress=progress), batch_size=max(batch_size, 256))
    return train, val
