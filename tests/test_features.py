"""extract_features / feature_loaders: a probe on cached features equals a probe through the frozen backbone."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from d2lft.features import extract_features, feature_loaders
from d2lft.freeze import freeze
from d2lft.net import Net
from d2lft.train import fit


def tiny_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    backbone = nn.Sequential()
    backbone.add_module("stem", nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()))
    backbone.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    return Net(backbone, nn.Linear(6, 3), blocks=["stem"], num_features=6, name="tiny")


def image_data(n: int = 20) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_features_come_from_the_backbone_in_eval_mode() -> None:
    net = tiny_net()
    net.train()
    bn = net.backbone.stem[1]
    stats = bn.running_mean.clone()
    data = image_data()
    feats = extract_features(net, DataLoader(data, batch_size=8), progress=False)
    x, y = data.tensors
    assert feats.tensors[0].shape == (20, 6) and feats.tensors[0].device.type == "cpu"
    assert torch.equal(feats.tensors[1], y)
    assert torch.equal(bn.running_mean, stats), "extraction must not update BatchNorm statistics"
    assert all(m.training for m in net.modules()), "layer modes are restored"
    net.eval()
    with torch.no_grad():
        assert torch.allclose(feats.tensors[0], net.forward_features(x), atol=1e-6)
    assert not feats.tensors[0].requires_grad


def test_images_only_loader_gives_features_only() -> None:
    x = image_data(5).tensors[0]
    feats = extract_features(tiny_net(), DataLoader(x, batch_size=2), progress=False)
    assert len(feats.tensors) == 1 and feats.tensors[0].shape == (5, 6)


def test_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match="expected a d2lft.Net"):
        extract_features(nn.Linear(2, 2), [torch.zeros(1, 2)], progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        extract_features(tiny_net(), [], progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        feature_loaders(tiny_net(), DataLoader(image_data()), None, batch_size=0, progress=False)


def test_feature_loaders_shapes_and_defaults() -> None:
    data = image_data()
    train, val = feature_loaders(tiny_net(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=4),
                                 progress=False)
    assert train.batch_size == 4 and len(train.dataset) == 20 and len(val.dataset) == 20
    xb, yb = next(iter(train))
    assert xb.shape == (4, 6) and yb.shape == (4,)
    train, val = feature_loaders(tiny_net(), DataLoader(data, batch_size=4), None, batch_size=16, progress=False)
    assert val is None and train.batch_size == 16


def test_probe_on_cached_features_equals_probe_through_the_frozen_backbone() -> None:
    """Same head weights after the same steps: caching changes the cost, not the result."""
    data = image_data()
    through = tiny_net()
    freeze(through.backbone)  # set_train_mode keeps its BatchNorm in eval, like extraction does
    cached = copy.deepcopy(through)

    images = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit(through, images, epochs=3, optimizer=torch.optim.SGD(through.head.parameters(), lr=0.1, momentum=0.9),
        seed=0, progress=False, device="cpu", channels_last=False)

    train, _ = feature_loaders(cached, DataLoader(data, batch_size=4), None, seed=0, progress=False)
    fit(cached.head, train, epochs=3, optimizer=torch.optim.SGD(cached.head.parameters(), lr=0.1, momentum=0.9),
        seed=0, progress=False, device="cpu")

    assert not torch.equal(through.head.weight, tiny_net().head.weight), "the head trained"
    assert torch.allclose(through.head.weight, cached.head.weight, atol=1e-5)
    assert torch.allclose(through.head.bias, cached.head.bias, atol=1e-5)
    for a, b in zip(through.backbone.state_dict().values(), cached.backbone.state_dict().values()):
        assert torch.equal(a, b), "the frozen backbone (and its BatchNorm statistics) did not change"
