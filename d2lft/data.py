"""Image folders as DataLoaders, prepared the way the model's weights expect.

`image_folders` turns any folder laid out as ``root/train/<class>/<image>`` and
``root/val/<class>/<image>`` (or ``test/``) into two DataLoaders, after checking the layout and
skipping unreadable images. The model's `Preprocessing` (mean, std, size, crop) decides how the
images are prepared, so data and weights cannot disagree::

    data = ft.image_folders(root, net)                  # the net's own preprocessing
    data = ft.image_folders(root, net, image_size=128)  # the same, at 128 px

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
import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2
from tqdm.auto import tqdm

from d2lft.errors import ConfigError
from d2lft.images import (IMAGE_EXTENSIONS, NOT_READ, BadImageError, DuplicateImageWarning, load_image,
                          printable_path, scan_images, shared_files)
from d2lft.net import Net, Preprocessing
from d2lft.transforms import check_augment, train_transform

__all__ = ["BadImageWarning", "CachedImageDataset", "ImageFolderData", "image_folders"]


# --------------------------------------------------------------------------- loaders


class BadImageWarning(UserWarning):
    """Files in class folders were skipped: unreadable, or not of an image type read (one warning per dataset)."""


#: The reports `image_folders` has made in this process, as (dataset folder, message): a course loads
#: the same photos in chapter after chapter, and a reader needs to hear about its stray GIF once.
_REPORTED: set[tuple[str, str]] = set()


class CachedImageDataset(Dataset):
    """Images decoded once into uint8 tensors ``(N, 3, S, S)``; `transform` runs on each one per item.

    Like `torchvision.datasets.ImageFolder`, it has `samples` (path, target), `classes` and a
    `transform` attribute that may be replaced.

    >>> ds = CachedImageDataset(torch.zeros(2, 3, 9, 9, dtype=torch.uint8), torch.tensor([0, 1]),
    ...                         paths=["a.png", "b.png"], classes=["a", "b"],
    ...                         transform=Preprocessing(image_size=8).eval_transform())
    >>> ds[1][0].shape, ds[1][1]
    (torch.Size([3, 8, 8]), tensor(1))
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, *, paths: Sequence[str],
                 classes: Sequence[str], transform) -> None:
        if not (len(images) == len(targets) == len(paths)):
            raise ConfigError(
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
    """What `image_folders` returns: the two loaders and what a model needs to know about them.

    ``preprocessing`` is the model's `Preprocessing` at the size the images were prepared at;
    ``augment`` the preset of the training transform. Both datasets carry the preprocessing too
    (``data.train.dataset.preprocessing``), so `d2lft.fit` can refuse data prepared for other weights.
    """

    train: DataLoader
    val: DataLoader
    classes: list[str]
    skipped: list[str]
    root: Path
    preprocessing: Preprocessing
    augment: str
    train_dataset: Dataset
    val_dataset: Dataset
    target: str = "class"
    cache: bool = field(default=True)

    @property
    def image_size(self) -> int:
        """Side of the square images the loaders yield."""
        return self.preprocessing.image_size

    def loader(self, split: str = "train", *, augment: bool = False, batch_size: int | None = None,
               transform=None) -> DataLoader:
        """A fresh, unshuffled DataLoader over `split`; ``augment=False`` uses the evaluation transform.

        Feature caching and evaluation on the training images need the train split *without*
        augmentation. `transform` reads the same images through another pipeline (chapter 6
        compares normalisations this way). The dataset is shared (cached images are not copied).

        >>> import tempfile
        >>> from d2lft.synthetic import make_shapes
        >>> data = image_folders(make_shapes(tempfile.mkdtemp(), train_per_class=2, val_per_class=1),
        ...                      Preprocessing(image_size=32), batch_size=4, progress=False)
        >>> len(data.loader("train").dataset) == len(data.train_dataset)
        True
        """
        if split not in ("train", "val"):
            raise ConfigError(f"split={split!r}: expected 'train' or 'val'")
        source = self.train_dataset if split == "train" else self.val_dataset
        if transform is None:
            transform = source.transform if augment else self.preprocessing.eval_transform()
        reference = self.train if split == "train" else self.val
        return DataLoader(_with_transform(source, transform), batch_size=batch_size or reference.batch_size,
                          shuffle=False, num_workers=reference.num_workers, pin_memory=reference.pin_memory)

    def with_augment(self, augment: str | v2.Transform) -> ImageFolderData:
        """The same images with another training transform: a preset name or any transform.

        Nothing is copied or decoded again, and this object is left as it was (chapter 6 compares
        pipelines this way). A custom transform must end with the model's normalisation
        (``preprocessing.normalize()``).
        """
        transform = train_transform(self.preprocessing, augment) if isinstance(augment, str) else augment
        train_dataset = _with_transform(self.train_dataset, transform)
        train = self._like(self.train, train_dataset, shuffle=True)
        return dataclasses.replace(self, train=train, train_dataset=train_dataset,
                                   augment=augment if isinstance(augment, str) else "custom")

    def resized(self, image_size: int) -> ImageFolderData:
        """The same images prepared at another size (no decoding again: the cache is resized on the fly).

        A CPU fine-tunes several times faster at 128 px than at 224; a probe's features can still
        come from the larger images of this object. At the size they already have: this object.
        """
        if image_size == self.preprocessing.image_size:
            return self
        preprocessing = self.preprocessing.with_size(image_size)
        train = _with_transform(self.train_dataset, train_transform(preprocessing, self.augment)
                                if self.augment != "custom" else self.train_dataset.transform)
        val = _with_transform(self.val_dataset, preprocessing.eval_transform())
        for dataset in (train, val):
            dataset.preprocessing = preprocessing
        return dataclasses.replace(
            self, preprocessing=preprocessing, train_dataset=train, val_dataset=val,
            train=self._like(self.train, train, shuffle=True), val=self._like(self.val, val, shuffle=False),
        )

    def holdout(self, fraction: float = 0.2, *, seed: int = 0) -> ImageFolderData:
        """The training images split in two, per class and seeded: train on the rest, choose on the hold-out.

        Whatever a run selects (the best epoch, a phase, a recipe) must be chosen on images that
        the figure it reports never saw: the result's ``val`` is the hold-out (evaluation
        transform) and ``val/`` stays untouched in this object for the final figure. Needs at
        least 2 training images per class.

        >>> import tempfile
        >>> from d2lft.synthetic import make_shapes
        >>> data = image_folders(make_shapes(tempfile.mkdtemp(), train_per_class=5, val_per_class=1),
        ...                      Preprocessing(image_size=16), progress=False)
        >>> inner = data.holdout(0.2)
        >>> len(inner.train_dataset), len(inner.val_dataset), len(data.train_dataset)
        (20, 5, 25)
        """
        if not 0 < fraction < 1:
            raise ConfigError(f"holdout: fraction={fraction!r}; expected a fraction between 0 and 1 (e.g. 0.2)")
        kept, held = [], []
        for key, items, order in self._shuffled_classes(seed):
            if len(items) < 2:
                name = self.classes[key] if self.target == "class" else "the data"
                raise ConfigError(f"holdout: class {name!r} has {len(items)} training image; a hold-out needs 2 or more")
            n = min(len(items) - 1, max(1, round(fraction * len(items))))
            held += [items[i] for i in sorted(order[:n])]
            kept += [items[i] for i in sorted(order[n:])]
        train_dataset = _subset(self.train_dataset, sorted(kept), self.train_dataset.transform)
        val_dataset = _subset(self.train_dataset, sorted(held), self.preprocessing.eval_transform())
        return dataclasses.replace(
            self, train_dataset=train_dataset, val_dataset=val_dataset,
            train=self._like(self.train, train_dataset, shuffle=True, seed=seed),
            val=self._like(self.val, val_dataset, shuffle=False),
        )

    def subsample(self, per_class: int, *, seed: int = 0) -> ImageFolderData:
        """The same data with `per_class` training images of each class, picked at random (seeded).

        For learning curves: the same task with less data. A class with fewer images keeps them
        all; ``val/`` is left as it is, and cached images are shared, not copied. For one `seed`
        the subsamples are nested: the 10 images per class include the 5 of ``subsample(5)``, so
        a curve shows what more images add, not other images. (A regression target has one
        "class": `per_class` images in all.)

        >>> import tempfile
        >>> from d2lft.synthetic import make_shapes
        >>> data = image_folders(make_shapes(tempfile.mkdtemp(), train_per_class=5, val_per_class=1),
        ...                      Preprocessing(image_size=16), progress=False)
        >>> small = data.subsample(2, seed=0)
        >>> len(small.train_dataset), len(small.val_dataset)
        (10, 5)
        >>> {p for p, _ in small.train_dataset.samples} < {p for p, _ in data.subsample(3).train_dataset.samples}
        True
        """
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ConfigError(f"subsample: per_class={per_class!r}; expected an int >= 1 (images per class)")
        kept = sorted(items[j] for _, items, order in self._shuffled_classes(seed) for j in order[:per_class])
        train_dataset = _subset(self.train_dataset, kept, self.train_dataset.transform)
        return dataclasses.replace(self, train_dataset=train_dataset,
                                   train=self._like(self.train, train_dataset, shuffle=True))

    def _shuffled_classes(self, seed: int) -> list[tuple[object, list[int], list[int]]]:
        """(class, indices of its training images, a seeded random order of them) for each class."""
        by_class: dict[object, list[int]] = {}
        for i, (_, t) in enumerate(self.train_dataset.samples):
            by_class.setdefault(t if self.target == "class" else 0, []).append(i)
        generator = torch.Generator().manual_seed(seed)
        return [(key, items, torch.randperm(len(items), generator=generator).tolist())
                for key, items in by_class.items()]

    def _like(self, reference: DataLoader, dataset: Dataset, *, shuffle: bool, seed: int | None = None) -> DataLoader:
        """A loader over `dataset` made as `image_folders` made `reference` (its batch size, workers, seed)."""
        if seed is None:
            seed = reference.generator.initial_seed() if reference.generator is not None else 0
        return _loader(dataset, batch_size=reference.batch_size, shuffle=shuffle,
                       num_workers=reference.num_workers, seed=seed)

    @property
    def num_outputs(self) -> int:
        """Width of the head this data needs: one per class, or 1 for a regression target."""
        return len(self.classes) if self.target == "class" else 1

    def __repr__(self) -> str:
        return (
            f"ImageFolderData(root={str(self.root)!r}, classes={self.classes}, target={self.target!r}, "
            f"train={len(self.train_dataset)} images, val={len(self.val_dataset)} images, "
            f"image_size={self.image_size}, augment={self.augment!r}, cache={self.cache}, skipped={len(self.skipped)})"
        )


def _subset(dataset: Dataset, indices: list[int], transform) -> Dataset:
    """The items `indices` of a dataset made by `image_folders`, with `transform` (cached images are shared)."""
    samples = [dataset.samples[i] for i in indices]
    if isinstance(dataset, CachedImageDataset):
        index = torch.tensor(indices, dtype=torch.long)
        part: Dataset = CachedImageDataset(dataset.images[index], dataset.targets[index], paths=[p for p, _ in samples],
                                           classes=dataset.classes, transform=transform)
    else:
        part = _FolderDataset(Path(dataset.root), classes=dataset.classes, samples=samples, transform=transform)
    part.preprocessing = dataset.preprocessing
    return part


def _with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of `dataset` (same images) with its own transform."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


def image_folders(
    root: str | os.PathLike[str],
    preprocessing: Net | Preprocessing | None = None,
    *,
    image_size: int | None = None,
    batch_size: int = 32,
    augment: str = "crop+flip",
    cache: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    target: str = "class",
    val_split: float | None = None,
    extensions: Sequence[str] = tuple(sorted(IMAGE_EXTENSIONS)),
    progress: bool = True,
) -> ImageFolderData:
    """Train and validation DataLoaders for ``root/train/<class>/*`` and ``root/val/`` (or ``root/test/``).

    Images are prepared as `preprocessing` says: pass the model (its ``net.preprocessing`` is
    used) or a `d2lft.Preprocessing`; it is required (None raises an error that says so), since
    a guessed default would silently mis-normalise other weights. `image_size` overrides its size (a CPU trains faster at
    128 px than at 224). The layout is checked first (errors name the folder and what to do).
    Every image is read once up front; unreadable ones are reported once each (a
    `BadImageWarning` per dataset and process, naming them relative to `root`) and skipped, and
    their paths, with files of other types, are in ``.skipped`` (every time).

    Args:
        augment: the training transform's preset (see `d2lft.transforms`).
        cache: decode and resize each image once into memory and augment the small tensors
            (fast); False streams files through `ImageFolder` each epoch (the classic path).
        target: "class" for labels from folder names, or a column of ``<split>/targets.csv``
            (e.g. "size" in the shapes dataset) for float regression targets.
        val_split: hold out this fraction of each class of ``train/`` (or of `root` itself when it
            holds class folders directly) as validation, instead of using ``val/``/``test/``.
        extensions: file types read as images.

    Example:
        >>> import tempfile
        >>> from d2lft.synthetic import make_shapes
        >>> net = Net(torch.nn.Flatten(), torch.nn.Identity(), blocks=[], num_features=1, name="any")
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     folder = make_shapes(tmp, train_per_class=2, val_per_class=1)
        ...     data = image_folders(folder, net, image_size=32, batch_size=4, progress=False)
        >>> images, labels = next(iter(data.train))  # cached: the files are no longer needed
        >>> images.shape, labels.shape, data.classes
        (torch.Size([4, 3, 32, 32]), torch.Size([4]), ['circle', 'cross', 'square', 'star', 'triangle'])
    """
    if isinstance(preprocessing, Net):
        preprocessing = preprocessing.preprocessing
    if not isinstance(preprocessing, Preprocessing):
        raise ConfigError(f"image_folders: pass the model (or its .preprocessing) after the folder, so the images "
                          f"are prepared as its weights expect: image_folders(root, net); got {preprocessing!r}")
    preprocessing = preprocessing.with_size(image_size)
    _check_options(batch_size=batch_size, augment=augment, num_workers=num_workers, val_split=val_split,
                   target=target)
    root = Path(root).expanduser()
    extensions = tuple(e.lower() for e in extensions)
    train_dir, val_dir = _split_dirs(root, val_split)
    classes = _class_names(train_dir)
    if target == "class" and len(classes) < 2:
        raise ConfigError(
            f"{train_dir} has only one class folder ({classes[0]!r}): a classifier needs at least two; "
            f"add one folder per class"
        )
    problems: list[tuple[str, str]] = []  # (path, why it was skipped), reported once below
    try:
        train_samples = _samples(train_dir, classes, extensions=extensions, target=target, problems=problems)
        if val_dir is None:
            train_samples, val_samples = _hold_out(train_samples, val_split, seed=seed, folder=train_dir)
            val_dir = train_dir
        else:
            val_classes = _class_names(val_dir)
            if val_classes != classes:
                raise ConfigError(
                    f"class folders differ: {train_dir} has {classes} but {val_dir} has {val_classes} "
                    f"(only in train: {sorted(set(classes) - set(val_classes))}, "
                    f"only in {val_dir.name}: {sorted(set(val_classes) - set(classes))}); "
                    f"give both splits the same class folders"
                )
            val_samples = _samples(val_dir, classes, extensions=extensions, target=target, problems=problems)
            for train_path, val_path in shared_files([p for p, _ in train_samples], [p for p, _ in val_samples]):
                warnings.warn(f"{val_path} is the same file as {train_path} (a link): this image is in both splits, so "
                              "validation scores on it are not honest; remove one of them", DuplicateImageWarning,
                              stacklevel=2)

        built = []
        for name, directory, samples, transform in (
            ("train", train_dir, train_samples, train_transform(preprocessing, augment)),
            ("val", val_dir, val_samples, preprocessing.eval_transform()),
        ):
            if cache:
                images, good = _decode_all(samples, preprocessing=preprocessing, problems=problems,
                                           desc=f"caching {name}", progress=progress)
            else:
                images, good = None, _check_all(samples, problems=problems, desc=f"checking {name}", progress=progress)
            _require_every_class(good, classes, directory)
            if cache:
                dtype = torch.int64 if target == "class" else torch.float32
                dataset: Dataset = CachedImageDataset(images, torch.tensor([t for _, t in good], dtype=dtype),
                                                      paths=[p for p, _ in good], classes=classes, transform=transform)
            else:
                if target != "class":
                    good = [(p, torch.tensor(t, dtype=torch.float32)) for p, t in good]
                dataset = _FolderDataset(directory, classes=classes, samples=good, transform=transform)
            dataset.preprocessing = preprocessing
            built.append(dataset)
    finally:  # also when a class is left without images: the reason is among these files
        _report_skipped(root, problems)

    train_dataset, val_dataset = built
    return ImageFolderData(
        train=_loader(train_dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, seed=seed),
        val=_loader(val_dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, seed=seed),
        classes=list(classes),
        skipped=[path for path, _ in problems],
        root=root,
        preprocessing=preprocessing,
        augment=augment,
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        target=target,
        cache=cache,
    )


def _check_options(*, batch_size: int, augment: str, num_workers: int, val_split: float | None,
                   target: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected a positive int (e.g. 32)")
    check_augment(augment)
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r}: expected 0 (load in the main process) or more")
    if val_split is not None and not 0 < val_split < 1:
        raise ConfigError(f"val_split={val_split!r}: expected a fraction between 0 and 1 (e.g. 0.2) or None")
    if not target:
        raise ConfigError("target='': expected 'class' or a column name of targets.csv (e.g. 'size')")


def _split_dirs(root: Path, val_split: float | None) -> tuple[Path, Path | None]:
    """(train folder, val folder); val is None when `val_split` carves it out of train."""
    if not root.is_dir():
        raise ConfigError(
            f"image folder {root} does not exist or is not a folder: pass the folder holding train/ and val/ "
            f"(e.g. get_dataset('hymenoptera') or course_dataset())"
        )
    train_dir = root / "train"
    if val_split is not None:
        return (train_dir if train_dir.is_dir() else root), None
    if not train_dir.is_dir():
        raise ConfigError(
            f"{root} has no train/ folder: expected {root}/train/<class>/<image> and {root}/val/<class>/<image>; "
            f"if the class folders are directly in {root}, pass val_split=0.2 (--val-split 0.2 on the command line)"
        )
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train_dir, root / name
    raise ConfigError(
        f"{root} has train/ but no val/ or test/ folder: add one with the same class folders, "
        f"or pass val_split=0.2 (--val-split 0.2) to hold out part of train/"
    )


def _class_names(split_dir: Path) -> list[str]:
    # Hidden folders are not classes: Jupyter leaves .ipynb_checkpoints/ in folders it opens.
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"{split_dir} has no class folders: expected one sub-folder per class, e.g. {split_dir}/cats/1.jpg"
        )
    return classes


def _samples(split_dir: Path, classes: list[str], *, extensions: tuple[str, ...], target: str,
             problems: list[tuple[str, str]]) -> list[tuple[str, object]]:
    """(path, class index or float target) for each image file; other visible files go to `problems`."""
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples, by_class = [], []
    for name in classes:  # one walk per class folder: no link followed twice, nothing bad dropped silently
        files, bad = scan_images(split_dir / name, extensions=extensions)
        samples += [(path, class_to_idx[name]) for path in files]
        by_class.append(files)
        problems += bad
    for first, second in shared_files(*by_class):
        warnings.warn(f"{second} is the same file as {first} (a link): one image under two labels; remove one",
                      DuplicateImageWarning, stacklevel=3)
    for name in classes:
        if not any(index == class_to_idx[name] for _, index in samples):
            raise ConfigError(f"class folder {split_dir / name} has no images ({' '.join(extensions)}): "
                             f"add images or remove the folder")
    if target != "class":
        values = _read_targets(split_dir, target)
        missing = [p for p, _ in samples if os.path.relpath(p, split_dir) not in values]
        if missing:
            raise ConfigError(f"{split_dir / 'targets.csv'} has no {target!r} value for {missing[0]} "
                             f"(and {len(missing) - 1} more): add a row per image")
        samples = [(p, values[os.path.relpath(p, split_dir)]) for p, _ in samples]
    return samples


def _read_targets(split_dir: Path, target: str) -> dict[str, float]:
    path = split_dir / "targets.csv"
    if not path.is_file():
        raise ConfigError(f"target={target!r} needs {path} with columns path,{target} (the 'shapes' dataset has one); "
                         f"use target='class' for labels from folder names")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if target not in (reader.fieldnames or []) or "path" not in (reader.fieldnames or []):
            raise ConfigError(f"{path} has columns {reader.fieldnames}, not 'path' and {target!r}: "
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
            raise ConfigError(
                f"class folder {folder / name} has {len(items)} image: val_split needs at least 2 per class"
            )
        order = torch.randperm(len(items), generator=generator).tolist()
        n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


def _decode_all(samples: list, *, preprocessing: Preprocessing, problems: list[tuple[str, str]], desc: str,
                progress: bool) -> tuple[torch.Tensor, list]:
    """Decode, resize (shorter side) and center-crop each image once: a uint8 tensor (N, 3, S, S)."""
    size, image_size = preprocessing.resize_size(), preprocessing.image_size
    resize = v2.Resize(size, interpolation=preprocessing._mode(), antialias=True)
    images = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    good = []
    for path, t in tqdm(samples, desc=desc, unit="img", disable=not progress):
        # No JPEG draft mode here: it was only 1.3x faster on the ants-vs-bees photos, and its
        # rounded reduced size shifts the crop so cached and uncached tensors no longer match.
        image = _load_or_report(path, problems)
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


def _check_all(samples: list, *, problems: list[tuple[str, str]], desc: str, progress: bool) -> list:
    """The samples whose image decodes: bad files are found now, not in the middle of an epoch."""
    good = []
    for path, t in tqdm(samples, desc=desc, unit="img", disable=not progress):
        if _load_or_report(path, problems) is not None:
            good.append((path, t))
    return good


def _load_or_report(path: str, problems: list[tuple[str, str]]):
    try:
        return load_image(path)
    except BadImageError as err:
        problems.append((printable_path(path), err.reason))
        return None


def _report_skipped(root: Path, problems: list[tuple[str, str]], *, shown: int = 10) -> None:
    """One `BadImageWarning` for all the files of a dataset that were skipped, once per process.

    Its text names the files relative to `root`, as a reader can find them on any machine. It is
    raised with `warnings.warn_explicit` at the dataset's name: `warnings.warn` would print the file
    and line of the caller first, which in a notebook is a temporary file and in the course's pages
    a path on the machine that built them. The warning stays a warning: filters, ``pytest.warns``
    and ``-W error::d2lft.data.BadImageWarning`` work as they do for any other.
    """
    if not problems:
        return
    prefix = printable_path(root) + os.sep

    def relative(text: str) -> str:
        return text.replace(prefix, "")

    types = [(relative(p), printable_path(Path(p).suffix) or "no extension") for p, why in problems if NOT_READ in why]
    other = [(relative(p), relative(why)) for p, why in problems if NOT_READ not in why]

    def listed(items: list[str]) -> str:
        more = len(items) - shown
        return ", ".join(items[:shown]) + (f" and {more} more (all in .skipped)" if more > 0 else "")

    parts = []
    if other:
        parts.append(f"{len(other)} unusable file{'s' * (len(other) > 1)}: "
                     + listed([f"{p} ({why})" for p, why in other]))
    if types:
        one = len(types) == 1
        parts.append(f"{len(types)} file{'' if one else 's'} that {'is' if one else 'are'} not an image type read "
                     f"here: " + listed([f"{p} ({suffix})" for p, suffix in types])
                     + f"; pass extensions=... to read {'it' if one else 'them'}")
    message = "skipped " + "; ".join(parts)
    name = Path(os.path.abspath(root)).name
    if (os.path.realpath(root), message) in _REPORTED:
        return
    _REPORTED.add((os.path.realpath(root), message))
    warnings.warn_explicit(message, BadImageWarning, filename=name, lineno=0, module=__name__)


def _require_every_class(samples: list, classes: list[str], directory: Path) -> None:
    present = {Path(p).relative_to(directory).parts[0] for p, _ in samples}
    empty = [c for c in classes if c not in present]
    if empty:
        raise ConfigError(f"no readable image left in {directory / empty[0]} (all were skipped, see the warnings): "
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
        # A last training batch of one image cannot train BatchNorm ("Expected more than 1 value per
        # channel"): drop that one image per epoch (a different one each epoch, as the order is shuffled).
        drop_last=shuffle and len(dataset) % batch_size == 1 and len(dataset) > 1,
        persistent_workers=num_workers > 0,
    )
