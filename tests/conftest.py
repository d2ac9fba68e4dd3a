"""Shared fixtures: the real photos (skipped with a reason when absent) and tiny generated image folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
REPO = Path(__file__).resolve().parent.parent


def _shared_data_dir() -> Path:
    value = os.environ.get("D2LFT_DATA_DIR")
    return Path(value).resolve() if value else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_test_process():
    """Tiny tensors train fastest on one thread; two threads fight on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def hymenoptera_root() -> Path:
    """The ants-vs-bees photos, or a skip that says how to provide them."""
    root = _shared_data_dir() / "hymenoptera_data"
    if not (root / "train").is_dir():
        pytest.skip(f"real photos not found at {root}: set D2LFT_DATA_DIR=../shared/data")
    return root


def make_image_folder(root: Path, classes=("a", "b"), per_class: int = 4, size: int = 40) -> Path:
    """Write a tiny ImageFolder tree (train/ and val/) of coloured JPEGs; returns `root`."""
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                colour = (40 + 150 * c, 60 + 10 * i, 200 - 150 * c)
                Image.new("RGB", (size + i, size), colour).save(folder / f"{i}.jpg")
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A two-class ImageFolder tree with 4 images per class and split."""
    return make_image_folder(tmp_path / "tiny")


def pytest_collection_modifyitems(items) -> None:
    """Mark every notebook cell item, so `pytest -m "not notebook"` runs the fast tests alone."""
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebook)
