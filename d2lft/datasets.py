"""Named datasets: a small immutable registry, verified downloads, and the course's default.

`get_dataset` finds a dataset folder under the data directory (``$D2LFT_DATA_DIR``) or fetches,
verifies and extracts it; `course_dataset` picks the ants-vs-bees photos when they can be had and
the generated "shapes" otherwise. For your own photos, skip the registry and call
``ft.image_folders("path/to/folder", net)``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

from d2lft import env, synthetic
from d2lft.errors import ConfigError, D2LFTError

__all__ = ["DATASETS", "DatasetInfo", "DatasetNotAvailableError", "course_dataset", "get_dataset", "list_datasets"]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset comes from and what its extracted folder must contain."""

    name: str
    url: str | None  # None: not downloadable (generated locally, or found under the data directory only)
    sha1: str | None  # None: no published hash; the extracted layout is checked instead
    folder: str  # name of the extracted folder under the data directory
    splits: tuple[str, ...]  # () when the class folders sit directly in `folder` (use val_split)
    classes: tuple[str, ...]
    description: str
    generated: bool = False  # made on this machine in seconds (d2lft.synthetic)


EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")

DATASETS = MappingProxyType(
    {
        "hotdog": DatasetInfo(
            name="hotdog",
            url="http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip",
            sha1="fba480ffa8aa7e0febbb511d181409f899b9baa5",
            folder="hotdog",
            splits=("train", "test"),
            classes=("hotdog", "not-hotdog"),
            description="Hot dog or not: 2,000 training and 1,800 test photos (d2l.ai), 261 MB",
        ),
        # PyTorch publishes no checksum for this archive, so a download is accepted only when the
        # extracted folder has the expected layout (train/ and val/, each with ants/ and bees/).
        "hymenoptera": DatasetInfo(
            name="hymenoptera",
            url="https://download.pytorch.org/tutorial/hymenoptera_data.zip",
            sha1=None,
            folder="hymenoptera_data",
            splits=("train", "val"),
            classes=("ants", "bees"),
            description="Ants vs bees: ~244 training and 153 validation photos (PyTorch tutorial), 45 MB",
        ),
        "shapes": DatasetInfo(
            name="shapes",
            url=None,
            sha1=None,
            folder=synthetic.FOLDER,
            splits=("train", "val"),
            classes=synthetic.CLASSES,
            description="Synthetic shapes on textured backgrounds, generated offline in seconds; "
            "targets.csv holds each object's size for regression",
            generated=True,
        ),
        # The authors publish no checksum for the RGB archive (and torchvision's md5 is of a re-hosted
        # copy), so, as for hymenoptera, a download is accepted when the extracted folder has the layout
        # of the release: 2750/<one folder per class>/<64x64 JPEGs>, 27,000 images, no train/val split.
        "eurosat": DatasetInfo(
            name="eurosat",
            url="https://madm.dfki.de/files/sentinel/EuroSAT.zip",
            sha1=None,
            folder="2750",
            splits=(),
            classes=EUROSAT_CLASSES,
            description="EuroSAT RGB (Helber et al. 2019, MIT): 27,000 Sentinel-2 land-use tiles, 64x64, "
            "10 classes, no split (use val_split), 90 MB",
        ),
        "eurosat_small": DatasetInfo(
            name="eurosat_small",
            url=None,
            sha1=None,
            folder="eurosat_small",
            splits=("train", "val"),
            classes=EUROSAT_CLASSES,
            description="1,500 EuroSAT RGB tiles, 100 train / 50 val per class (the course's shared data; "
            "not downloadable: found under D2LFT_DATA_DIR)",
        ),
    }
)


class DatasetNotAvailableError(D2LFTError, RuntimeError):
    """A named dataset is neither on disk nor downloadable; the message says how to get it.

    `reason` is a few words (e.g. ``"offline"``) for one-line summaries.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def list_datasets() -> list[DatasetInfo]:
    """The datasets `get_dataset` knows.

    >>> [d.name for d in list_datasets()]
    ['hotdog', 'hymenoptera', 'shapes', 'eurosat', 'eurosat_small']
    """
    return list(DATASETS.values())


def get_dataset(name: str, *, root: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Path to the extracted dataset `name` under `root` (default: `d2lft.env.data_dir()`).

    A folder already there is used as is; otherwise the archive is downloaded, verified and
    extracted ("shapes" is generated instead). Raises `DatasetNotAvailableError` saying what to
    do when the dataset cannot be had: it never substitutes another dataset.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     get_dataset("shapes", root=tmp).name
        'shapes'
    """
    if name not in DATASETS:
        raise ConfigError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)}. "
            f"For your own photos, call image_folders('path/to/folder') directly"
        )
    info = DATASETS[name]
    root = Path(root).expanduser() if root is not None else env.data_dir()
    if info.generated:
        return synthetic.make_shapes(_generated_root(root, info.folder))
    folder = root / info.folder
    if folder.exists():
        problem = _layout_problem(folder, info)
        if problem:
            raise DatasetNotAvailableError(
                f"{folder} exists but {problem}: fix it, or delete it so get_dataset({name!r}) downloads it again",
                reason="incomplete folder",
            )
        return folder
    if info.url is None:
        raise DatasetNotAvailableError(
            f"dataset {name!r} not found at {folder}; it cannot be downloaded: set D2LFT_DATA_DIR to the folder "
            f"holding {info.folder}/ (the course's shared data)", reason="not found")
    if (not download or env.offline()) and not _archive_path(info, root).is_file():
        why = "download=False" if not download else "offline: D2LFT_OFFLINE is set"
        raise DatasetNotAvailableError(
            f"dataset {name!r} not found at {folder} ({why}); {_how_to_get(info, root)}",
            reason="not found, " + why,
        )
    return _download_and_extract(info, root)


def _generated_root(root: Path, folder: str) -> Path:
    """Where a generated dataset lives: `root`, unless it lacks the dataset and is read-only
    (a shared photo folder, say); then the writable default data directory."""
    if (root / folder / "manifest.json").exists() or _writable(root):
        return root
    fallback = env.data_dir(use_environment=False)
    print(f"d2lft: {root} is read-only; generating {folder!r} in {fallback}")
    return fallback


def _writable(path: Path) -> bool:
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def course_dataset(
    *, root: str | os.PathLike[str] | None = None, download: bool = True, verbose: bool = True
) -> Path:
    """The course's dataset: the ants-vs-bees photos if found or downloadable, else "shapes".

    Prints one line saying which one it uses (and, for "shapes", how to get the photos).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     course_dataset(root=tmp, download=False, verbose=False).name
        'shapes'
    """
    root_path = Path(root).expanduser() if root is not None else env.data_dir()
    try:
        path = get_dataset("hymenoptera", root=root_path, download=download)
        message = f"Using the ants-vs-bees photos (hymenoptera) at {path}"
    except DatasetNotAvailableError as err:
        path = get_dataset("shapes", root=root_path)
        info = DATASETS["hymenoptera"]
        message = (
            f"Ants-vs-bees photos unavailable ({err.reason}): using the synthetic 'shapes' dataset at {path}. "
            f"For the real photos, unzip {info.url} into {root_path} (or set D2LFT_DATA_DIR)."
        )
    if verbose:
        print(message)
    return path


def _layout_problem(folder: Path, info: DatasetInfo) -> str | None:
    """What is missing from an extracted dataset folder, or None when it looks complete."""
    for split in info.splits or ("",):
        for name in info.classes:
            class_dir = folder / split / name
            if not class_dir.is_dir() or not any(class_dir.iterdir()):
                return f"has no images in {Path(split, name)}/"
    return None


def _archive_path(info: DatasetInfo, root: Path) -> Path:
    """Where a downloaded (or hand-downloaded) archive of `info` is kept until it is extracted."""
    return root / Path(urlparse(info.url).path).name


def _how_to_get(info: DatasetInfo, root: Path) -> str:
    return (
        f"download {info.url} by hand and save it as {_archive_path(info, root)} (d2lft verifies and extracts it), "
        f"or extract it yourself so that {root / info.folder / (info.splits or info.classes)[0]} exists"
    )


def _download_and_extract(info: DatasetInfo, root: Path) -> Path:
    from d2lft.download import DownloadError, download_url, extract_archive

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetNotAvailableError(f"cannot create the data folder {root} ({err.strerror}); pass another "
                                       "--root or set D2LFT_DATA_DIR to a writable folder", reason="no data folder") from None
    if not os.access(root, os.W_OK):
        raise DatasetNotAvailableError(f"the data folder {root} is not writable; pass another --root or set "
                                       "D2LFT_DATA_DIR to a writable folder", reason="read-only data folder")
    archive = _archive_path(info, root)
    try:
        download_url(info.url, archive, sha1=info.sha1)
    except DownloadError as err:  # its message already says how to save the file by hand, in `root`
        raise DatasetNotAvailableError(f"dataset {info.name!r}: {err}", reason="download failed") from err
    # Extract into a hidden sibling and rename, so an interrupted extraction never looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{info.folder}-", dir=root))
    try:
        try:
            extract_archive(archive, staging)
        except Exception as err:  # a corrupt or unsafe archive: whatever the extractor raised
            archive.unlink(missing_ok=True)  # so that the next call downloads it again
            raise DatasetNotAvailableError(
                f"could not extract {archive} (from {info.url}): {err}; it was deleted: {_how_to_get(info, root)}",
                reason="bad archive",
            ) from err
        extracted = staging / info.folder
        problem = _layout_problem(extracted, info) if extracted.is_dir() else f"has no folder {info.folder}/"
        if problem:
            archive.unlink(missing_ok=True)
            raise DatasetNotAvailableError(
                f"the archive from {info.url} {problem}; it may be corrupt or changed and was deleted: "
                f"{_how_to_get(info, root)}",
                reason="unexpected archive layout",
            )
        os.replace(extracted, root / info.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink(missing_ok=True)
    return root / info.folder
