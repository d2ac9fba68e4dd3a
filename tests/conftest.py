"""Shared fixtures: the real photos (skipped with a reason when absent) and tiny generated image folders."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest
import torch

# Agg for this process only: an MPLBACKEND in the environment would reach the chapters' kernels and
# JupyterLab, which must draw with the notebook's inline backend
matplotlib.use("Agg")
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


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt is a bug in these tests: fail loudly instead of touching the internet."""
    from d2lft import download

    def refuse(url, dest, **kwargs):
        raise download.DownloadError(f"test: no network for {url}")

    monkeypatch.setattr(download, "download_url", refuse)
    monkeypatch.delenv("D2LFT_OFFLINE", raising=False)


def _shared_folder(name: str, what: str) -> Path:
    root = _shared_data_dir() / name
    if not (root / "train").is_dir():
        pytest.skip(f"{what} not found at {root}: set D2LFT_DATA_DIR=../shared/data")
    return root


@pytest.fixture(scope="session")
def hymenoptera_root() -> Path:
    """The ants-vs-bees photos, or a skip that says how to provide them."""
    return _shared_folder("hymenoptera_data", "real photos")


@pytest.fixture(scope="session")
def eurosat_root() -> Path:
    """The EuroSAT satellite tiles of eurosat_small, or a skip that says how to provide them."""
    return _shared_folder("eurosat_small", "EuroSAT tiles")


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


def realpath_limit_tar(archive: Path, *, extract_dir_length: int, climb: int = 1) -> Path:
    """A tar that escapes Python's "data" filter through CVE-2025-4517 (its test, `test_realpath_limit_attack`).

    Short links ``a`` .. ``p`` expand into folders with long names, so the path of the last link exceeds
    PATH_MAX once resolved and ``os.path.realpath`` stops resolving it: the filter believes ``escape``
    (``<last link>/..``, with `climb` extra ``..``) stays inside while the kernel resolves it `climb`
    folders above the folder the archive is extracted into, and ``escape/evil.txt`` is written there.
    `extract_dir_length` is the length of the path of that folder (the component length depends on it).
    """
    import io
    import tarfile

    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - extract_dir_length - 1) // (len(steps) + 1))
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, kind, linkname="", data=None):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = kind, linkname, 0o777 if kind == tarfile.DIRTYPE else 0o644
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)

        path = ""
        for step in steps:
            add(os.path.join(path, component), tarfile.DIRTYPE)
            add(os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        link = os.path.join(*steps, "l" * 254)
        add(link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add("escape", tarfile.SYMTYPE, os.path.join(link, *[".."] * climb))
        add("escape/evil.txt", tarfile.REGTYPE, data=b"written outside")
    return archive
