"""extract_features / feature_loaders / probe: a probe on cached features equals one through the frozen backbone."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_image_folder
from nets import staged_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from d2lft.data import image_folders
from d2lft.features import extract_features, feature_loaders, probe
from d2lft.freeze import freeze
from d2lft.net import Net
from d2lft.train import fit


def tiny_net(seed: int = 0) -> Net:
    net = staged_net(3)
    torch.manual_seed(seed)
    return net


@pytest.fixture
def folders(tmp_path):
    """An ImageFolderData of 3 classes x 6 images, prepared for `tiny_net` at 16 px."""
    root = make_image_folder(tmp_path / "f", classes=("a", "b", "c"), per_class=6, size=20)
    return image_folders(root, tiny_net(), image_size=16, batch_size=4, progress=False)


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
    assert feats.tensors[0].shape == (20, 8) and feats.tensors[0].device.type == "cpu"
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
    assert len(feats.tensors) == 1 and feats.tensors[0].shape == (5, 8)


def test_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match="expected a d2lft.Net"):
        extract_features(nn.Linear(2, 2), [torch.zeros(1, 2)], progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        extract_features(tiny_net(), [], progress=False)


def test_feature_loaders_shapes_and_defaults(folders) -> None:
    train, val = feature_loaders(tiny_net(), folders, progress=False)
    assert train.batch_size == 64 and len(train.dataset) == 18 and len(val.dataset) == 18
    xb, yb = next(iter(train))
    assert xb.shape == (18, 8) and yb.shape == (18,)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        feature_loaders(tiny_net(), folders, batch_size=0, progress=False)


def test_probe_on_cached_features_equals_probe_through_the_frozen_backbone(folders) -> None:
    """Same head weights after the same steps: caching changes the cost, not the result."""
    through = tiny_net()
    freeze(through.backbone)  # set_train_mode keeps its BatchNorm in eval, like extraction does
    cached = copy.deepcopy(through)

    images = DataLoader(folders.loader("train").dataset, batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    fit(through, images, epochs=3, optimizer=torch.optim.SGD(through.head.parameters(), lr=0.1, momentum=0.9),
        seed=0, progress=False, device="cpu", channels_last=False, best=None)

    train, _ = feature_loaders(cached, folders, batch_size=4, seed=0, progress=False)
    fit(cached.head, train, epochs=3, optimizer=torch.optim.SGD(cached.head.parameters(), lr=0.1, momentum=0.9),
        seed=0, progress=False, device="cpu", best=None)

    assert not torch.equal(through.head.weight, tiny_net().head.weight), "the head trained"
    assert torch.allclose(through.head.weight, cached.head.weight, atol=1e-5)
    assert torch.allclose(through.head.bias, cached.head.bias, atol=1e-5)
    for a, b in zip(through.backbone.state_dict().values(), cached.backbone.state_dict().values()):
        assert torch.equal(a, b), "the frozen backbone (and its BatchNorm statistics) did not change"


def test_probe_trains_only_the_head(folders) -> None:
    net = tiny_net()
    backbone = copy.deepcopy(net.backbone.state_dict())
    history = probe(net, folders, epochs=5, lr=1e-2)
    assert len(history) == 5 and history.val_acc[-1] is not None
    assert all(torch.equal(v, backbone[k]) for k, v in net.backbone.state_dict().items())
    assert not any(p.requires_grad for p in net.backbone.parameters())  # left frozen, as it says
