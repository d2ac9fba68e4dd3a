"""Datasets for the course: a small registry, verified downloads, and ImageFolder loaders.

`get_dataset` finds or fetches a dataset folder; `image_folders` turns any folder laid out as
``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (or ``test/``) into two
DataLoaders, after checking the layout and skipping unreadable images.

The fast path (``cache=True``) decodes and resizes every image once, keeps the small uint8
tensors in memory (about 100 KB per image at 160 px), and runs the augmentation on them:
decoding a JPEG costs far more than the augmentation, and a course trains for many epochs on a
few hundred photos. Measured on the ants-vs-bees photos (397 images, one CPU thread, 160 px):
1.5 s to build the cache, then ~1,500 training images/s against ~270 for ``cache=False``, the
classic ``torchvision.datasets.ImageFolder`` pipeline with the same transforms.
"""
from __future__ import annotations

import copy

import csv
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlparse

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from tqdm.auto import tqdm

from d2lft import env, synthetic
from d2lft.images import BadImageError, DuplicateImageWarning, load_image, printable_path, scan_images, shared_files
from d2lft.net import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "AUGMENT_PRESETS",
    "BadImageWarning",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotAvailableError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderData",
    "CachedImageDataset",
    "course_dataset",
    "eval_transform",
    "get_dataset",
    "image_folders",
    "list_datasets",
    "train_transform",
]

AUGMENT_PRESETS = ("none", "crop+flip", "crop+flip+color")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetInfo:
    """Where a dataset comes from and what its extracted folder must contain."""

    name: str
    url: str | None  # None: generated locally (see d2lft.synthetic)
    sha1: str | None  # None: no published hash; the extracted layout is checked instead
    folder: str  # name of the extracted folder under the data directory
    splits: tuple[str, ...]
    classes: tuple[str, ...]
    description: str


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
        ),
    }
)


class DatasetNotAvailableError(RuntimeError):
    """A named dataset is neither on disk nor downloadable; the message says how to get it.

    `reason` is a few words (e.g. ``"offline"``) for one-line summaries.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def list_datasets() -> list[DatasetInfo]:
    """The datasets `get_dataset` knows.

    >>> [d.name for d in list_datasets()]
    ['hotdog', 'hymenoptera', 'shapes']
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
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS)}. "
            f"For your own photos, call image_folders('path/to/folder') directly"
        )
    info = DATASETS[name]
    root = Path(root).expanduser() if root is not None else env.data_dir()
    if info.url is None:
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
    if not download or env.offline():
        why = "download=False" if not download else "offline: D2LFT_OFFLINE is set"
        raise DatasetNotAvailableError(
            f"dataset {name!r} not found at {folder} ({why}). {_how_to_get(info, root)}",
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
    for split in info.splits:
        for name in info.classes:
            class_dir = folder / split / name
            if not class_dir.is_dir() or not any(class_dir.iterdir()):
                return f"has no images in {split}/{name}/"
    return None


def _how_to_get(info: DatasetInfo, root: Path) -> str:
    return (
        f"Download {info.url} and extract it so that {root / info.folder / info.splits[0]} exists "
        f"(or set D2LFT_DATA_DIR to a folder holding {info.folder}/), then call get_dataset again"
    )


def _download_and_extract(info: DatasetInfo, root: Path) -> Path:
    from d2lft.download import DownloadError, download_url, extract_archive

    root.mkdir(parents=True, exist_ok=True)
    archive = root / Path(urlparse(info.url).path).name
    try:
        download_url(info.url, archive, sha1=info.sha1)
    except DownloadError as err:
        raise DatasetNotAvailableError(
            f"could not download dataset {info.name!r}: {err}. {_how_to_get(info, root)}", reason="download failed"
        ) from err
    # Extract into a hidden sibling and rename, so an interrupted extraction never looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{info.folder}-", dir=root))
    try:
        try:
            extract_archive(archive, staging)
        except Exception as err:  # a corrupt or unsafe archive: whatever the extractor raised
            archive.unlink(missing_ok=True)  # so that the next call downloads it again
            raise DatasetNotAvailableError(
                f"could not extract {archive} (downloaded from {info.url}): {err}. {_how_to_get(info, root)}",
                reason="bad archive",
            ) from err
        extracted = staging / info.folder
        problem = _layout_problem(extracted, info) if extracted.is_dir() else f"has no folder {info.folder}/"
        if problem:
            archive.unlink(missing_ok=True)
            raise DatasetNotAvailableError(
                f"the archive from {info.url} {problem}; it may be corrupt or changed. {_how_to_get(info, root)}",
                reason="unexpected archive layout",
            )
        os.replace(extracted, root / info.folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    archive.unlink(missing_ok=True)
    return root / info.folder


# --------------------------------------------------------------------------- transforms


def train_transform(
    augment: str = "crop+flip",
    image_size: int = 160,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Training preprocessing for PIL images or uint8 tensors: an augmentation preset, then normalize.

    Presets: "none" (same as `eval_transform`), "crop+flip" (RandomResizedCrop + horizontal flip),
    "crop+flip+color" (plus ColorJitter).

    >>> train_transform("crop+flip", 64)(torch.zeros(3, 80, 80, dtype=torch.uint8)).shape
    torch.Size([3, 64, 64])
    """
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment={augment!r} is not a preset; choose one of {AUGMENT_PRESETS}")
    if augment == "none":
        return eval_transform(image_size, mean=mean, std=std)
    steps: list = [
        v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if augment == "crop+flip+color":
        steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
    return v2.Compose(steps + _to_normalized_tensor(mean, std))


def eval_transform(
    image_size: int = 160, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Evaluation preprocessing: shorter side to ``round(image_size * 8 / 7)``, center crop, normalize.

    >>> eval_transform(64)(torch.zeros(3, 100, 80, dtype=torch.uint8)).shape
    torch.Size([3, 64, 64])
    """
    return v2.Compose(
        [v2.Resize(_resize_size(image_size), antialias=True), v2.CenterCrop(image_size)]
        + _to_normalized_tensor(mean, std)
    )


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]


def _resize_size(image_size: int) -> int:
    return round(image_size * 8 / 7)


# --------------------------------------------------------------------------- loaders


class BadImageWarning(UserWarning):
    """A file in a class folder was skipped: unreadable, or not of an image type read (one warning per file)."""


class CachedImageDataset(Dataset):
    """Images decoded once into uint8 tensors ``(N, 3, S, S)``; `transform` runs on each one per item.

    Like `torchvision.datasets.ImageFolder`, it has `samples` (path, target), `classes` and a
    `transform` attribute that may be replaced.

    >>> ds = CachedImageDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]),
    ...                         paths=["a.png", "b.png"], classes=["a", "b"], transform=eval_transform(4))
    >>> ds[1][0].shape, ds[1][1]
    (torch.Size([3, 4, 4]), tensor(1))
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, paths: Sequence[str],
                 classes: Sequence[str], transform) -> None:
        if not (len(images) == len(targets) == len(paths)):
            raise ValueError(
                f"{len(images)} images, {len(targets)} targets and {len(paths)} paths: expected equal counts"
            )
        self.images = images
        self.targets = targets
        self.samples = list(zip(paths, targets.tolist()))
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.targets[index]


class _FolderDataset(datasets.ImageFolder):
    """`ImageFolder` over a given list of samples (bad images removed, class order fixed by train/)."""

    def __init__(
        self, directory: Path, *, classes: Sequence[str], samples: list[tuple[str, object]], transform
    ) -> None:
        self._fixed_classes = list(classes)
        self._given = list(samples)
        super().__init__(str(directory), transform=transform, loader=load_image, allow_empty=True)
        self.samples = self.imgs = list(samples)  # also carries regression targets and val_split subsets
        self.targets = [t for _, t in samples]

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}

    def make_dataset(self, *args, **kwargs) -> list[tuple[str, object]]:  # the folder was scanned once already
        return self._given


@dataclass(repr=False)
class ImageFolderData:
    """What `image_folders` returns: the two loaders and what a model needs to know about them."""

    train: DataLoader
    val: DataLoader
    classes: list[str]
    skipped: list[str]
    root: Path
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_dataset: Dataset
    val_dataset: Dataset
    target: str = "class"
    cache: bool = field(default=True)

    def loader(self, split: str = "train", *, augment: bool = False, batch_size: int | None = None) -> DataLoader:
        """A fresh, unshuffled DataLoader over `split`; ``augment=False`` uses the evaluation transform.

        Feature caching and evaluation on the training images need the train split *without*
        augmentation. The dataset is shared (cached images are not copied).

        >>> import tempfile
        >>> from d2lft.synthetic import make_shapes
        >>> data = image_folders(make_shapes(tempfile.mkdtemp(), train_per_class=2, val_per_class=1),
        ...                      image_size=32, batch_size=4, progress=False)
        >>> len(data.loader("train").dataset) == len(data.train_dataset)
        True
        """
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: expected 'train' or 'val'")
        source = self.train_dataset if split == "train" else self.val_dataset
        dataset = copy.copy(source)  # shallow: same images, its own transform
        dataset.transform = source.transform if augment else eval_transform(self.image_size, mean=self.mean,
                                                                           std=self.std)
        reference = self.train if split == "train" else self.val
        return DataLoader(dataset, batch_size=batch_size or reference.batch_size, shuffle=False,
                          num_workers=reference.num_workers, pin_memory=reference.pin_memory)

    @property
    def num_outputs(self) -> int:
        """Width of the head this data needs: one per class, or 1 for a regression target."""
        return len(self.classes) if self.target == "class" else 1

    def __repr__(self) -> str:
        return (
            f"ImageFolderData(root={str(self.root)!r}, classes={self.classes}, target={self.target!r}, "
            f"train={len(self.train_dataset)} images, val={len(self.val_dataset)} images, "
            f"image_size={self.image_size}, cache={self.cache}, skipped={len(self.skipped)})"
        )


def image_folders(
    root: str | os.PathLike[str],
    *,
    image_size: int = 160,
    batch_size: int = 32,
    augment: str = "crop+flip",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    cache: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    target: str = "class",
    val_split: float | None = None,
    extensions: Sequence[str] = IMG_EXTENSIONS,
    progress: bool = True,
) -> ImageFolderData:
    """Train and validation DataLoaders for ``root/train/<class>/*`` and ``root/val/`` (or ``root/test/``).

    The layout is checked first (errors name the folder and what to do). Every image is read
    once up front; unreadable ones are reported once each (a `BadImageWarning`, which a
    notebook shows and a test or script can filter or turn into an error) and skipped, and
    their paths, with files of other types (e.g. a ``.gif`` placeholder), are in ``.skipped``.

    Args:
        cache: decode and resize each image once into memory and augment the small tensors
            (fast); False streams files through `ImageFolder` each epoch (the classic path).
        target: "class" for labels from folder names, or a column of ``<split>/targets.csv``
            (e.g. "size" in the shapes dataset) for float regression targets.
        val_split: hold out this fraction of each class of ``train/`` (or of `root` itself when it
            holds class folders directly) as validation, instead of using ``val/``/``test/``.
        extensions: file types read as images (torchvision's ImageFolder list by default).

    Example:
        >>> import tempfile
        >>> from d2lft.synthetic import make_shapes
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = make_shapes(tmp, train_per_class=2, val_per_class=1)
        ...     data = image_folders(folder, image_size=32, batch_size=4, progress=False)
        >>> images, labels = next(iter(data.train))  # cached: the files are no longer needed
        >>> images.shape, labels.shape, data.classes
        (torch.Size([4, 3, 32, 32]), torch.Size([4]), ['circle', 'cross', 'square', 'star', 'triangle'])
    """
    _check_options(image_size=image_size, batch_size=batch_size, augment=augment, num_workers=num_workers,
                   val_split=val_split, target=target)
    root = Path(root).expanduser()
    extensions = tuple(e.lower() for e in extensions)
    train_dir, val_dir = _split_dirs(root, val_split)
    classes = _class_names(train_dir)
    if target == "class" and len(classes) < 2:
        raise ValueError(
            f"{train_dir} has only one class folder ({classes[0]!r}): a classifier needs at least two; "
            f"add one folder per class"
        )
    skipped: list[str] = []
    train_samples = _samples(train_dir, classes, extensions=extensions, target=target, skipped=skipped)
    if val_dir is None:
        train_samples, val_samples = _hold_out(train_samples, val_split, seed=seed, folder=train_dir)
        val_dir = train_dir
    else:
        val_classes = _class_names(val_dir)
        if val_classes != classes:
            raise ValueError(
                f"class folders differ: {train_dir} has {classes} but {val_dir} has {val_classes} "
                f"(only in train: {sorted(set(classes) - set(val_classes))}, "
                f"only in {val_dir.name}: {sorted(set(val_classes) - set(classes))}); "
                f"give both splits the same class folders"
            )
        val_samples = _samples(val_dir, classes, extensions=extensions, target=target, skipped=skipped)
        for train_path, val_path in shared_files([p for p, _ in train_samples], [p for p, _ in val_samples]):
            warnings.warn(f"{val_path} is the same file as {train_path} (a link): this image is in both splits, so "
                          "validation scores on it are not honest; remove one of them", DuplicateImageWarning,
                          stacklevel=2)

    train_tf = train_transform(augment, image_size, mean=mean, std=std)
    eval_tf = eval_transform(image_size, mean=mean, std=std)
    built = []
    for name, directory, samples, transform in (
        ("train", train_dir, train_samples, train_tf),
        ("val", val_dir, val_samples, eval_tf),
    ):
        if cache:
            images, good = _decode_all(
                samples, image_size=image_size, skipped=skipped, desc=f"caching {name}", progress=progress
            )
        else:
            images, good = None, _check_all(samples, skipped=skipped, desc=f"checking {name}", progress=progress)
        _require_every_class(good, classes, directory)
        if cache:
            dtype = torch.int64 if target == "class" else torch.float32
            dataset: Dataset = CachedImageDataset(images, torch.tensor([t for _, t in good], dtype=dtype),
                                                  paths=[p for p, _ in good], classes=classes, transform=transform)
        else:
            if target != "class":
                good = [(p, torch.tensor(t, dtype=torch.float32)) for p, t in good]
            dataset = _FolderDataset(directory, classes=classes, samples=good, transform=transform)
        built.append(dataset)

    train_dataset, val_dataset = built
    return ImageFolderData(
        train=_loader(train_dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=seed),
        val=_loader(val_dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, seed=seed),
        classes=list(classes),
        skipped=skipped,
        root=root,
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        target=target,
        cache=cache,
    )


def _check_options(*, image_size: int, batch_size: int, augment: str, num_workers: int,
                   val_split: float | None, target: str) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size={image_size!r}: expected an int of at least 8 pixels (e.g. 160 or 224)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int (e.g. 32)")
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"augment={augment!r} is not a preset; choose one of {AUGMENT_PRESETS}")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers!r}: expected 0 (load in the main process) or more")
    if val_split is not None and not 0 < val_split < 1:
        raise ValueError(f"val_split={val_split!r}: expected a fraction between 0 and 1 (e.g. 0.2) or None")
    if not target:
        raise ValueError("target='': expected 'class' or a column name of targets.csv (e.g. 'size')")


def _split_dirs(root: Path, val_split: float | None) -> tuple[Path, Path | None]:
    """(train folder, val folder); val is None when `val_split` carves it out of train."""
    if not root.is_dir():
        raise ValueError(
            f"image folder {root} does not exist or is not a folder: pass the folder holding train/ and val/ "
            f"(e.g. get_dataset('hymenoptera') or course_dataset())"
        )
    train_dir = root / "train"
    if val_split is not None:
        return (train_dir if train_dir.is_dir() else root), None
    if not train_dir.is_dir():
        raise ValueError(
            f"{root} has no train/ folder: expected {root}/train/<class>/<image> and {root}/val/<class>/<image>; "
            f"if the class folders are directly in {root}, pass val_split=0.2"
        )
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train_dir, root / name
    raise ValueError(
        f"{root} has train/ but no val/ or test/ folder: add one with the same class folders, "
        f"or pass val_split=0.2 to hold out part of train/"
    )


def _class_names(split_dir: Path) -> list[str]:
    # Hidden folders are not classes: Jupyter leaves .ipynb_checkpoints/ in folders it opens.
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{split_dir} has no class folders: expected one sub-folder per class, e.g. {split_dir}/cats/1.jpg"
        )
    return classes


def _samples(split_dir: Path, classes: list[str], *, extensions: tuple[str, ...], target: str,
             skipped: list[str]) -> list[tuple[str, object]]:
    """(path, class index or float target) for each image file; other visible files go to `skipped`."""
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples, by_class = [], []
    for name in classes:  # one walk per class folder: no link followed twice, nothing bad dropped silently
        files, bad = scan_images(split_dir / name, extensions=extensions)
        samples += [(path, class_to_idx[name]) for path in files]
        by_class.append(files)
        for path, reason in bad:
            skipped.append(path)
            warnings.warn(f"skipping {path}: {reason}", BadImageWarning, stacklevel=3)
    for first, second in shared_files(*by_class):
        warnings.warn(f"{second} is the same file as {first} (a link): one image under two labels; remove one",
                      DuplicateImageWarning, stacklevel=3)
    for name in classes:
        if not any(index == class_to_idx[name] for _, index in samples):
            raise ValueError(f"class folder {split_dir / name} has no images ({' '.join(extensions)}): "
                             f"add images or remove the folder")
    if target != "class":
        values = _read_targets(split_dir, target)
        missing = [p for p, _ in samples if os.path.relpath(p, split_dir) not in values]
        if missing:
            raise ValueError(f"{split_dir / 'targets.csv'} has no {target!r} value for {missing[0]} "
                             f"(and {len(missing) - 1} more): add a row per image")
        samples = [(p, values[os.path.relpath(p, split_dir)]) for p, _ in samples]
    return samples


def _read_targets(split_dir: Path, target: str) -> dict[str, float]:
    path = split_dir / "targets.csv"
    if not path.is_file():
        raise ValueError(f"target={target!r} needs {path} with columns path,{target} (the 'shapes' dataset has one); "
                         f"use target='class' for labels from folder names")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if target not in (reader.fieldnames or []) or "path" not in (reader.fieldnames or []):
            raise ValueError(f"{path} has columns {reader.fieldnames}, not 'path' and {target!r}: "
                             f"pick target= from its columns")
        return {os.path.normpath(row["path"]): float(row[target]) for row in reader}


def _hold_out(samples: list, fraction: float, *, seed: int, folder: Path) -> tuple[list, list]:
    """Split each class's samples (stratified, seeded) into train and validation lists."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[str, list] = {}
    for path, t in samples:
        by_class.setdefault(Path(path).relative_to(folder).parts[0], []).append((path, t))
    train, val = [], []
    for name, items in by_class.items():
        if len(items) < 2:
            raise ValueError(
                f"class folder {folder / name} has {len(items)} image: val_split needs at least 2 per class"
            )
        order = torch.randperm(len(items), generator=generator).tolist()
        n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


def _decode_all(samples: list, *, image_size: int, skipped: list[str], desc: str,
                progress: bool) -> tuple[torch.Tensor, list]:
    """Decode, resize (shorter side) and center-crop each image once: a uint8 tensor (N, 3, S, S)."""
    size = _resize_size(image_size)
    resize = v2.Resize(size, antialias=True)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    good = []
    for path, t in tqdm(samples, desc=desc, unit="img", disable=not progress):
        # No JPEG draft mode here: it was only 1.3x faster on the ants-vs-bees photos, and its
        # rounded reduced size shifts the crop so cached and uncached tensors no longer match.
        image = _load_or_report(path, skipped)
        if image is not None:
            images[len(good)] = v2.functional.pil_to_tensor(_square_crop(resize(image), image_size))
            good.append((path, t))
    return images[: len(good)].clone() if len(good) < len(samples) else images, good


def _square_crop(image, image_size: int):
    """The square of side min(H, W) whose center `image_size` crop is exactly ``CenterCrop(image_size)(image)``.

    A plain center square can sit one pixel off (both crops round half-pixels), and then the cached
    and uncached evaluation tensors would differ.
    """
    width, height = image.size
    side = min(width, height)

    def start(length: int) -> int:
        offset = round((length - image_size) / 2) - round((side - image_size) / 2)
        return min(max(offset, 0), length - side)

    return v2.functional.crop(image, start(height), start(width), side, side)


def _check_all(samples: list, *, skipped: list[str], desc: str, progress: bool) -> list:
    """The samples whose image decodes: bad files are found now, not in the middle of an epoch."""
    good = []
    for path, t in tqdm(samples, desc=desc, unit="img", disable=not progress):
        if _load_or_report(path, skipped) is not None:
            good.append((path, t))
    return good


def _load_or_report(path: str, skipped: list[str]):
    try:
        return load_image(path)
    except BadImageError as err:
        skipped.append(printable_path(path))
        warnings.warn(f"skipping unreadable image: {err}", BadImageWarning, stacklevel=4)
        return None


def _require_every_class(samples: list, classes: list[str], directory: Path) -> None:
    present = {Path(p).relative_to(directory).parts[0] for p, _ in samples}
    empty = [c for c in classes if c not in present]
    if empty:
        raise ValueError(f"no readable image left in {directory / empty[0]} (all were skipped, see the warnings): "
                         f"replace the files or remove the folder")


def _loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    # A generator of its own: the same seed gives the same order, whatever else used the global RNG.
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
        persistent_workers=num_workers > 0,
    )
