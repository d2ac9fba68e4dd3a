"""The dataset registry, get_dataset and course_dataset (never touches the network)."""
from __future__ import annotations

import dataclasses
import shutil
import zipfile
from pathlib import Path

import pytest
from conftest import make_image_folder, realpath_limit_tar

from d2lft import download
from d2lft.datasets import DATASETS, DatasetNotAvailableError, course_dataset, get_dataset, list_datasets
from d2lft.synthetic import CLASSES


REAL_DOWNLOAD_URL = download.download_url


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: any download attempt fails the test


def fake_hymenoptera(root: Path) -> Path:
    folder = root / "hymenoptera_data"
    make_image_folder(folder, classes=("ants", "bees"), per_class=2)
    return folder


# --------------------------------------------------------------------------- registry


def test_registry_is_immutable():
    with pytest.raises(TypeError):
        DATASETS["mine"] = DATASETS["shapes"]
    with pytest.raises(TypeError):
        del DATASETS["hotdog"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["hotdog"].url = "http://example.org/evil.zip"


def test_registry_entries():
    assert [d.name for d in list_datasets()] == ["hotdog", "hymenoptera", "shapes", "eurosat", "eurosat_small"]
    hotdog, ants = DATASETS["hotdog"], DATASETS["hymenoptera"]
    assert hotdog.sha1 == "fba480ffa8aa7e0febbb511d181409f899b9baa5" and hotdog.splits == ("train", "test")
    assert ants.sha1 is None and ants.folder == "hymenoptera_data" and ants.classes == ("ants", "bees")
    assert DATASETS["shapes"].url is None and DATASETS["shapes"].classes == CLASSES


# --------------------------------------------------------------------------- get_dataset / course_dataset


def test_get_dataset_uses_an_existing_folder_without_downloading(tmp_path):
    folder = fake_hymenoptera(tmp_path)
    assert get_dataset("hymenoptera", root=tmp_path) == folder


def test_get_dataset_default_root_is_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("D2LFT_DATA_DIR", str(tmp_path))
    folder = fake_hymenoptera(tmp_path)
    assert get_dataset("hymenoptera") == folder


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cats'.*hotdog, hymenoptera, shapes, eurosat, eurosat_small"):
        get_dataset("cats", root=tmp_path)


def test_failed_download_is_an_error_not_a_substitute(tmp_path):
    with pytest.raises(DatasetNotAvailableError, match="hotdog.zip") as err:
        get_dataset("hotdog", root=tmp_path)
    assert "test: no network" in str(err.value) and err.value.reason == "download failed"
    assert not (tmp_path / "shapes").exists()


@pytest.mark.parametrize("how", ["download=False", "offline"])
def test_no_download_allowed_says_where_to_put_it(tmp_path, monkeypatch, how):
    def must_not_download(url, dest, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(download, "download_url", must_not_download)
    if how == "offline":
        monkeypatch.setenv("D2LFT_OFFLINE", "1")
    with pytest.raises(DatasetNotAvailableError) as err:
        get_dataset("hymenoptera", root=tmp_path, download=how != "download=False")
    message = str(err.value)
    assert str(tmp_path / "hymenoptera_data") in message and "hymenoptera_data.zip" in message


def test_incomplete_existing_folder_is_reported_not_overwritten(tmp_path):
    folder = fake_hymenoptera(tmp_path)
    shutil.rmtree(folder / "val" / "bees")
    with pytest.raises(DatasetNotAvailableError, match=r"hymenoptera_data exists but has no images in val/bees"):
        get_dataset("hymenoptera", root=tmp_path)
    assert (folder / "train" / "ants").is_dir()


def _zip_folder(folder: Path, archive: Path) -> None:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())


def test_download_is_extracted_checked_and_the_archive_removed(tmp_path, monkeypatch):
    source = fake_hymenoptera(tmp_path / "server")
    _zip_folder(source, tmp_path / "server.zip")
    calls = []

    def fake_download(url, dest, *, sha1=None, **kwargs):
        calls.append((url, sha1))
        shutil.copy(tmp_path / "server.zip", dest)
        return Path(dest)

    monkeypatch.setattr(download, "download_url", fake_download)
    root = tmp_path / "data"
    folder = get_dataset("hymenoptera", root=root)
    assert folder == root / "hymenoptera_data"
    assert calls == [(DATASETS["hymenoptera"].url, None)]
    assert sorted(p.name for p in (folder / "val").iterdir()) == ["ants", "bees"]
    assert sorted(p.name for p in root.iterdir()) == ["hymenoptera_data"]  # no archive, no staging folder


def test_download_with_the_wrong_layout_is_refused(tmp_path, monkeypatch):
    source = tmp_path / "server" / "hymenoptera_data"
    make_image_folder(source, classes=("ants", "wasps"), per_class=1)
    _zip_folder(source, tmp_path / "server.zip")
    monkeypatch.setattr(download, "download_url",
                        lambda url, dest, **kw: Path(shutil.copy(tmp_path / "server.zip", dest)))
    root = tmp_path / "data"
    with pytest.raises(DatasetNotAvailableError, match="no images in train/bees"):
        get_dataset("hymenoptera", root=root)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("how", ["download=False", "offline"])
def test_course_dataset_falls_back_to_shapes_with_one_line(tmp_path, monkeypatch, capsys, how):
    if how == "offline":
        monkeypatch.setenv("D2LFT_OFFLINE", "1")
    path = course_dataset(root=tmp_path, download=how != "download=False")
    assert path == tmp_path / "shapes" and (path / "train" / "star").is_dir()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert "shapes" in lines[0] and DATASETS["hymenoptera"].url in lines[0] and str(tmp_path) in lines[0]


def test_course_dataset_prefers_the_photos(tmp_path, capsys):
    folder = fake_hymenoptera(tmp_path)
    assert course_dataset(root=tmp_path) == folder
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "hymenoptera" in out[0]
    assert course_dataset(root=tmp_path, verbose=False) == folder
    assert capsys.readouterr().out == ""


def test_crafted_archive_saved_where_the_message_says_writes_nothing_outside(tmp_path, monkeypatch):
    # Issue 11, defect 1: the by-hand advice says "save it as <root>/hymenoptera_data.zip"; hymenoptera has
    # no published SHA-1, so a file there is used as is. A tar under that name, crafted for Python's
    # CVE-2025-4517, wrote escape/evil.txt next to the data folder and the command said "ready".
    monkeypatch.setattr(download, "download_url", REAL_DOWNLOAD_URL)  # the real one: it reuses the file
    root = tmp_path / "data"
    root.mkdir()
    staging = len(str(root)) + len("/.hymenoptera_data-") + 8 + len("/.hymenoptera_data.zip.extracting-") + 8
    realpath_limit_tar(root / "hymenoptera_data.zip", extract_dir_length=staging, climb=3)
    with pytest.raises(DatasetNotAvailableError, match="could not extract .*is a symbolic link"):
        get_dataset("hymenoptera", root=root)
    assert not list(tmp_path.rglob("evil.txt"))
    assert list(root.iterdir()) == []  # the bad archive is deleted, no staging folder is left


def test_offline_a_hand_saved_archive_is_used_where_the_message_said(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "download_url", REAL_DOWNLOAD_URL)  # the real one: it reuses the file
    monkeypatch.setenv("D2LFT_OFFLINE", "1")
    source = fake_hymenoptera(tmp_path / "server")
    root = tmp_path / "data"
    with pytest.raises(DatasetNotAvailableError) as err:
        get_dataset("hymenoptera", root=root)
    archive = root / "hymenoptera_data.zip"
    assert f"save it as {archive}" in str(err.value)
    root.mkdir()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, path.relative_to(source.parent).as_posix())
    assert get_dataset("hymenoptera", root=root) == root / "hymenoptera_data"
    assert not archive.exists()


def test_eurosat_small_is_found_under_the_data_dir_and_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "download_url", lambda *a, **k: pytest.fail("download attempted"))
    with pytest.raises(DatasetNotAvailableError, match="cannot be downloaded: set D2LFT_DATA_DIR"):
        get_dataset("eurosat_small", root=tmp_path)
    folder = tmp_path / "eurosat_small"
    make_image_folder(folder, classes=DATASETS["eurosat_small"].classes, per_class=1)
    assert get_dataset("eurosat_small", root=tmp_path) == folder


@pytest.mark.photos
def test_the_shared_eurosat_small_has_the_registry_layout():
    root = Path(__import__("os").environ.get("D2LFT_DATA_DIR", "../shared/data"))
    if not (root / "eurosat_small" / "train").is_dir():
        pytest.skip(f"eurosat_small not found under {root}: set D2LFT_DATA_DIR=../shared/data")
    folder = get_dataset("eurosat_small", root=root)
    assert (folder / "SOURCE.txt").is_file()  # the attribution travels with the data
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(DATASETS["eurosat_small"].classes)


def test_eurosat_archive_layout_is_checked_without_a_published_checksum(tmp_path, monkeypatch):
    # The release extracts to 2750/<class>/ with no train/val split: that layout is what is verified.
    source = tmp_path / "server" / "2750"
    for name in DATASETS["eurosat"].classes:
        (source / name).mkdir(parents=True)
        (source / name / f"{name}_1.jpg").write_bytes(b"jpeg")
    archive = tmp_path / "server.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, path.relative_to(source.parent).as_posix())
    monkeypatch.setattr(download, "download_url", lambda url, dest, **kw: Path(shutil.copy(archive, dest)))
    assert DATASETS["eurosat"].sha1 is None
    assert get_dataset("eurosat", root=tmp_path / "data") == tmp_path / "data" / "2750"
