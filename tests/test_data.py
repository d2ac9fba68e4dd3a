"""The image_folders loaders: layout checks, bad files, caching, splits (never touches the network)."""
from __future__ import annotations

import json
import math
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from d2lft import data, download
from d2lft.data import BadImageWarning, image_folders
from d2lft.images import DuplicateImageWarning
from d2lft.net import Preprocessing
from d2lft.synthetic import make_shapes

FAST = dict(image_size=32, batch_size=4, progress=False)
#: ImageNet's normalisation, as a torchvision model would ask for it
IMAGENET = Preprocessing()


pytestmark = pytest.mark.usefixtures("no_network")  # conftest: any download attempt fails the test


@pytest.fixture
def shapes_root(tmp_path) -> Path:
    return make_shapes(tmp_path / "data", train_per_class=3, val_per_class=2, image_size=40)


# --------------------------------------------------------------------------- layout errors


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nope'} does not exist"):
        image_folders(tmp_path / "nope", IMAGENET, **FAST)


def test_missing_train_split(tiny_folder):
    shutil.rmtree(tiny_folder / "train")
    with pytest.raises(ValueError, match=f"{tiny_folder} has no train/ folder.*val_split"):
        image_folders(tiny_folder, IMAGENET, **FAST)


def test_missing_val_split(tiny_folder):
    shutil.rmtree(tiny_folder / "val")
    with pytest.raises(ValueError, match=f"{tiny_folder} has train/ but no val/ or test/"):
        image_folders(tiny_folder, IMAGENET, **FAST)


def test_test_split_serves_as_validation(tiny_folder):
    (tiny_folder / "val").rename(tiny_folder / "test")
    assert len(image_folders(tiny_folder, IMAGENET, **FAST).val_dataset) == 8


def test_empty_class_folder(tiny_folder):
    (tiny_folder / "val" / "c").mkdir()
    (tiny_folder / "train" / "c").mkdir()
    with pytest.raises(ValueError, match=f"class folder {tiny_folder / 'train' / 'c'} has no images"):
        image_folders(tiny_folder, IMAGENET, **FAST)


def test_single_class(tiny_folder):
    for split in ("train", "val"):
        shutil.rmtree(tiny_folder / split / "b")
    with pytest.raises(ValueError, match=f"{tiny_folder / 'train'} has only one class folder \\('a'\\)"):
        image_folders(tiny_folder, IMAGENET, **FAST)


def test_classes_differ_between_splits(tiny_folder):
    (tiny_folder / "val" / "b").rename(tiny_folder / "val" / "B")
    with pytest.raises(ValueError, match=r"class folders differ.*only in train: \['b'\], only in val: \['B'\]"):
        image_folders(tiny_folder, IMAGENET, **FAST)


def test_hidden_folders_and_files_are_ignored(tiny_folder):
    (tiny_folder / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter leaves these: not a class
    (tiny_folder / "train" / "a" / ".DS_Store").write_bytes(b"\0\0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = image_folders(tiny_folder, IMAGENET, **FAST)
    assert result.classes == ["a", "b"] and result.skipped == []


@pytest.mark.parametrize(
    "option, value", [("augment", "mixup"), ("image_size", 0), ("batch_size", 0), ("val_split", 1.5)]
)
def test_bad_options_name_the_setting(tiny_folder, option, value):
    with pytest.raises(ValueError, match=option):
        image_folders(tiny_folder, IMAGENET, **{**FAST, option: value})


# --------------------------------------------------------------------------- bad images


def _add_bad_images(folder: Path) -> list[str]:
    good = folder / "train" / "a" / "0.jpg"
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": good.read_bytes()[: len(good.read_bytes()) // 2],
        "notes.jpg": b"this is a text file, not a picture\n",
    }
    for name, content in bad.items():
        (folder / "train" / "a" / name).write_bytes(content)
    (folder / "val" / "b" / "readme.txt").write_text("not an image type")
    return sorted([str(folder / "train" / "a" / n) for n in bad] + [str(folder / "val" / "b" / "readme.txt")])


@pytest.mark.parametrize("cache", [True, False])
def test_bad_images_are_reported_once_and_skipped(tiny_folder, cache):
    expected = _add_bad_images(tiny_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = image_folders(tiny_folder, IMAGENET, cache=cache, **FAST)
        again = image_folders(tiny_folder, IMAGENET, cache=not cache, **FAST)  # another cell, another chapter
    reports = [w for w in caught if issubclass(w.category, BadImageWarning)]
    assert sorted(result.skipped) == sorted(again.skipped) == expected  # the list, every time
    assert len(reports) == 1  # one line for the whole dataset, once per process
    # what a reader sees, prefix included: the files relative to the dataset, no path of this machine
    shown = warnings.formatwarning(reports[0].message, reports[0].category, reports[0].filename, reports[0].lineno)
    assert str(tiny_folder.parent) not in shown and shown.count("\n") == 1, shown
    assert shown.startswith("tiny:0: BadImageWarning: skipped 3 unusable files: train/a/empty.jpg (the file is empty")
    assert "train/a/truncated.jpg (cannot decode the image: OSError: Truncated File Read)" in shown
    assert shown.rstrip().endswith("1 file that is not an image type read here: val/b/readme.txt (.txt); "
                                   "pass extensions=... to read it")
    # the loaders still work, on the good images only, epoch after epoch, with no further warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert sum(len(y) for _, y in result.train) == 8
            assert sum(len(y) for _, y in result.val) == 8


def test_a_class_with_only_bad_images_is_an_error(tiny_folder):
    for path in (tiny_folder / "val" / "b").iterdir():
        path.write_bytes(b"")
    message = f"no readable image left in {tiny_folder / 'val' / 'b'}"
    with pytest.warns(BadImageWarning), pytest.raises(ValueError, match=message):
        image_folders(tiny_folder, IMAGENET, **FAST)


# --------------------------------------------------------------------------- tensors, caching, shuffling


@pytest.mark.parametrize("cache", [True, False])
def test_batches_are_normalized_float_images_with_int_labels(tiny_folder, cache):
    result = image_folders(tiny_folder, IMAGENET, cache=cache, augment="none", **FAST)
    images, labels = next(iter(result.val))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and type(images) is torch.Tensor
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 0, 0]
    # class "a" is a flat colour (40, 60 + 10 i, 200) saved as JPEG: normalized with the ImageNet statistics
    red = (40 / 255 - 0.485) / 0.229
    assert torch.allclose(images[:, 0], torch.full_like(images[:, 0], red), atol=3 / 255 / 0.229)
    assert result.classes == ["a", "b"] and result.num_outputs == 2
    assert not result.train.pin_memory or torch.cuda.is_available()
    assert len(result.train) == 2 and result.train.drop_last is False


def test_cached_and_uncached_evaluation_give_the_same_tensors(tmp_path):
    folder = tmp_path / "odd"
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        # Textured, odd sizes (172 x 110 is resized to 86 x 55, where a plain center square would
        # round its crop one pixel away from CenterCrop(48)): any shift would show.
        for name, sizes in (("wide", [(97, 61), (172, 110)]), ("tall", [(50, 83), (110, 172)])):
            (folder / split / name).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                pixels = torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / split / name / f"{i}.png")
    cached = image_folders(folder, IMAGENET, cache=True, image_size=48, progress=False)
    plain = image_folders(folder, IMAGENET, cache=False, image_size=48, progress=False)
    for i in range(len(plain.val_dataset)):
        assert cached.val_dataset.samples[i][0] == plain.val_dataset.samples[i][0]
        assert torch.allclose(cached.val_dataset[i][0], plain.val_dataset[i][0], atol=1e-5)
        assert cached.val_dataset[i][0].shape == (3, 48, 48)
    assert cached.train_dataset[0][0].shape == plain.train_dataset[0][0].shape == (3, 48, 48)


def test_cache_holds_small_uint8_squares(tiny_folder):
    dataset = image_folders(tiny_folder, IMAGENET, **FAST).train_dataset
    assert dataset.images.dtype == torch.uint8
    assert dataset.images.shape == (8, 3, round(32 * 8 / 7), round(32 * 8 / 7))


def _labels_in_order(result) -> list[int]:
    return [label for _, labels in result.train for label in labels.tolist()]


def test_seeded_shuffling_is_reproducible(shapes_root):
    first = image_folders(shapes_root, IMAGENET, seed=3, **FAST)
    again = image_folders(shapes_root, IMAGENET, seed=3, **FAST)
    other = image_folders(shapes_root, IMAGENET, seed=4, **FAST)
    epoch1 = _labels_in_order(first)
    assert epoch1 == _labels_in_order(again)
    assert epoch1 != _labels_in_order(other)
    assert _labels_in_order(first) != epoch1  # a new order each epoch
    assert sorted(epoch1) == sorted(l for _, l in first.train_dataset.samples)


def test_every_epoch_order_is_reproducible(shapes_root):
    a, b = image_folders(shapes_root, IMAGENET, seed=0, **FAST), image_folders(shapes_root, IMAGENET, seed=0, **FAST)
    assert [_labels_in_order(a) for _ in range(3)] == [_labels_in_order(b) for _ in range(3)]


def test_worker_processes_give_the_same_batches(tiny_folder):
    main = image_folders(tiny_folder, IMAGENET, augment="none", **FAST)
    workers = image_folders(tiny_folder, IMAGENET, augment="none", num_workers=1, **FAST)
    for (x0, y0), (x1, y1) in zip(main.train, workers.train):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)


# --------------------------------------------------------------------------- regression targets, val_split


@pytest.mark.parametrize("cache", [True, False])
def test_size_target_for_regression(shapes_root, cache):
    result = image_folders(shapes_root, IMAGENET, target="size", cache=cache, **FAST)
    assert result.num_outputs == 1
    _, sizes = next(iter(result.val))
    assert sizes.dtype == torch.float32 and sizes.shape == (4,)
    rows = (shapes_root / "val" / "targets.csv").read_text().splitlines()[1:]
    expected = {line.split(",")[0]: float(line.split(",")[2]) for line in rows}
    for path, value in result.val_dataset.samples:
        relative = Path(path).relative_to(shapes_root / "val").as_posix()
        assert math.isclose(float(value), expected[relative], rel_tol=1e-6)


def test_regression_target_needs_a_targets_file(tiny_folder, shapes_root):
    with pytest.raises(ValueError, match=f"{tiny_folder / 'train' / 'targets.csv'}"):
        image_folders(tiny_folder, IMAGENET, target="size", **FAST)
    with pytest.raises(ValueError, match="not 'path' and 'angle'"):
        image_folders(shapes_root, IMAGENET, target="angle", **FAST)


def test_val_split_holds_out_part_of_each_class(tmp_path):
    folder = tmp_path / "mine"
    for name in ("a", "b"):  # class folders directly in the root, no train/ or val/
        make_image_folder(tmp_path / "tmp", classes=(name,), per_class=5)
        shutil.move(tmp_path / "tmp" / "train" / name, folder / name)
    result = image_folders(folder, IMAGENET, val_split=0.4, **FAST)
    again = image_folders(folder, IMAGENET, val_split=0.4, **FAST)
    val_paths = [p for p, _ in result.val_dataset.samples]
    assert len(val_paths) == 4 and len(result.train_dataset) == 6
    assert sorted(l for _, l in result.val_dataset.samples) == [0, 0, 1, 1]
    assert not set(val_paths) & {p for p, _ in result.train_dataset.samples}
    assert val_paths == [p for p, _ in again.val_dataset.samples]


def test_repr_is_a_short_summary(tiny_folder):
    text = repr(image_folders(tiny_folder, IMAGENET, **FAST))
    assert "train=8 images" in text and "classes=['a', 'b']" in text and "DataLoader" not in text


# --------------------------------------------------------------------------- the real photos


@pytest.mark.photos
@pytest.mark.parametrize("cache", [True, False])
def test_hymenoptera(hymenoptera_root, cache, monkeypatch):
    monkeypatch.setattr(data, "_REPORTED", set())  # as in a fresh kernel: another test may have loaded them
    with pytest.warns(BadImageWarning) as caught:
        result = image_folders(hymenoptera_root, IMAGENET, cache=cache, image_size=64, progress=False)
    # the line the course's pages show, the same on every machine
    assert [(w.filename, str(w.message)) for w in caught if w.category is BadImageWarning] == [
        ("hymenoptera_data", "skipped 1 file that is not an image type read here: train/ants/imageNotFound.gif "
                             "(.gif); pass extensions=... to read it")]
    assert result.classes == ["ants", "bees"]
    assert len(result.train_dataset) == 244 and len(result.val_dataset) == 153
    # a GIF placeholder ("this image could not be found"), not an ant: left out, and said so
    assert result.skipped == [str(hymenoptera_root / "train" / "ants" / "imageNotFound.gif")]
    images, labels = next(iter(result.val))
    assert images.shape == (32, 3, 64, 64) and set(labels.tolist()) <= {0, 1}


# --------------------------------------------------------------------------- preprocessing from the model


def test_the_model_decides_the_normalisation(tiny_folder):
    half = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3)
    a = image_folders(tiny_folder, half, augment="none", **FAST)
    b = image_folders(tiny_folder, IMAGENET, augment="none", **FAST)
    x, _ = a.val_dataset[0]
    raw = a.val_dataset.images[0].float() / 255  # the cached uint8 square (37 px), before normalising
    centre = raw[:, 2:34, 2:34]  # its centre 32 px: the evaluation crop
    assert torch.allclose(x, (centre - 0.5) / 0.5, atol=1e-6)
    assert a.preprocessing.mean == (0.5, 0.5, 0.5) and a.train_dataset.preprocessing == a.preprocessing
    assert not torch.allclose(x, b.val_dataset[0][0])


def test_a_folder_without_its_model_is_refused(tiny_folder):
    with pytest.raises(ValueError, match=r"image_folders\(root, net\)"):
        image_folders(tiny_folder, image_size=32)  # the old call: silently ImageNet's statistics
    with pytest.raises(ValueError, match=r"image_folders\(root, net\)"):
        image_folders(tiny_folder, "imagenet", **FAST)


def test_with_augment_leaves_the_original_alone(tiny_folder):
    data = image_folders(tiny_folder, IMAGENET, augment="crop+flip", **FAST)
    plain = data.with_augment("none")
    assert plain.augment == "none" and data.augment == "crop+flip"
    assert plain.train_dataset.images is data.train_dataset.images  # nothing decoded or copied again
    x0, _ = plain.train_dataset[0]
    assert torch.equal(x0, plain.train_dataset[0][0])  # deterministic: the evaluation transform
    assert data.train_dataset.transform is not plain.train_dataset.transform


def test_a_last_training_batch_of_one_is_dropped(tmp_path):
    # 9 images, batch 4: the last batch would hold one image, which BatchNorm cannot train on
    folder = make_image_folder(tmp_path / "odd", classes=("a", "b", "c"), per_class=3)
    data = image_folders(folder, IMAGENET, **FAST)
    assert [len(y) for _, y in data.train] == [4, 4]
    assert [len(y) for _, y in data.val] == [4, 4, 1]  # evaluation sees every image


# Issue 11: symlinks (defect 5), long thin images (defect 2) and non-UTF-8 names (defect 10) in a folder.


@pytest.mark.parametrize("cache", [True, False])
def test_a_link_loop_does_not_multiply_the_training_set(tiny_folder, cache):
    os.symlink(".", tiny_folder / "train" / "a" / "self")  # ln -s . train/a/self: 4 images became 84
    with pytest.warns(BadImageWarning, match=r"train/a/self \(the same folder as train/a"):
        result = image_folders(tiny_folder, IMAGENET, cache=cache, **FAST)
    assert len(result.train_dataset) == 8 and sum(len(y) for _, y in result.train) == 8
    assert result.skipped == [str(tiny_folder / "train" / "a" / "self")]


def test_a_dangling_link_is_skipped_and_reported_not_an_abort(tiny_folder):
    os.symlink(tiny_folder / "gone.jpg", tiny_folder / "train" / "a" / "gone.jpg")
    with pytest.warns(BadImageWarning, match=r"train/a/gone.jpg \(a link to .*gone.jpg', which does not exist"):
        result = image_folders(tiny_folder, IMAGENET, **FAST)
    assert result.skipped == [str(tiny_folder / "train" / "a" / "gone.jpg")] and len(result.train_dataset) == 8


def test_a_link_from_train_into_val_is_named_in_a_warning(tiny_folder):
    val_image = tiny_folder / "val" / "b" / "0.jpg"
    os.symlink(val_image, tiny_folder / "train" / "a" / "from-val.jpg")
    with pytest.warns(DuplicateImageWarning) as caught:
        image_folders(tiny_folder, IMAGENET, **FAST)
    message = str(caught[0].message)
    assert str(val_image) in message and str(tiny_folder / "train" / "a" / "from-val.jpg") in message


def test_a_class_folder_linked_to_another_is_named_in_a_warning(tiny_folder):
    shutil.rmtree(tiny_folder / "train" / "b")
    os.symlink("a", tiny_folder / "train" / "b")  # the same images under two labels
    with pytest.warns(DuplicateImageWarning, match="one image under two labels"):
        image_folders(tiny_folder, IMAGENET, **FAST)


def test_a_pipe_named_jpg_and_an_unreadable_folder_are_reported(tiny_folder, monkeypatch):
    os.mkfifo(tiny_folder / "train" / "a" / "pipe.jpg")  # a reader would block on it forever
    locked = tiny_folder / "train" / "b" / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # tests run as root here, where chmod 000 cannot make a folder unreadable
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(BadImageWarning) as caught:
        result = image_folders(tiny_folder, IMAGENET, **FAST)
    assert sorted(result.skipped) == [str(tiny_folder / "train" / "a" / "pipe.jpg"), str(locked)]
    messages = " ".join(str(w.message) for w in caught)
    assert "not a regular file" in messages and "cannot read this folder (Permission denied)" in messages


def test_a_long_thin_image_in_a_folder_is_skipped_and_reported(tiny_folder):
    from test_images import thin_png

    strip = thin_png(tiny_folder / "train" / "a" / "strip.png", 1_000_000)
    with pytest.warns(BadImageWarning, match="aspect ratio of 125,000:1"):
        result = image_folders(tiny_folder, IMAGENET, **FAST)
    assert result.skipped == [str(strip)] and len(result.train_dataset) == 8


def test_a_non_utf8_file_name_is_reported_as_printable_json_safe_text(tiny_folder):
    name = os.fsdecode(b"caf\xe9.txt")  # Latin-1 bytes, as a Windows zip or an old camera writes them
    (tiny_folder / "train" / "a" / name).write_text("not an image")
    bad_image = os.fsdecode(b"\xff\xfe.jpg")
    (tiny_folder / "train" / "b" / bad_image).write_bytes(b"")
    shutil.copy(tiny_folder / "train" / "b" / "0.jpg", tiny_folder / "train" / "b" / os.fsdecode(b"\xe9t\xe9.jpg"))
    with pytest.warns(BadImageWarning):
        result = image_folders(tiny_folder, IMAGENET, **FAST)
    assert len(result.train_dataset) == 9  # a good image with such a name is read like any other
    assert sorted(result.skipped) == sorted([f"{tiny_folder}/train/a/caf\\xe9.txt", f"{tiny_folder}/train/b/\\xff\\xfe.jpg"])
    text = json.dumps({"skipped": result.skipped}, ensure_ascii=False)
    text.encode("utf-8")  # what writing the JSON (or printing it) does: no UnicodeEncodeError
    assert json.loads(text)["skipped"] == result.skipped


@pytest.mark.parametrize("cache", [True, False])
def test_holdout_carves_train_per_class_and_leaves_val_alone(shapes_root, cache):
    data = image_folders(shapes_root, IMAGENET, cache=cache, **FAST)
    inner = data.holdout(0.34, seed=1)
    train = {p for p, _ in inner.train_dataset.samples}
    held = {p for p, _ in inner.val_dataset.samples}
    assert not train & held and train | held == {p for p, _ in data.train_dataset.samples}
    per_class = [sum(1 for _, t in inner.val_dataset.samples if t == c) for c in range(len(data.classes))]
    assert per_class == [1] * len(data.classes)  # 3 training images per class: one held out from each
    assert data.val_dataset.samples == image_folders(shapes_root, IMAGENET, cache=cache, **FAST).val_dataset.samples
    x, _ = inner.val_dataset[0]
    assert torch.equal(x, inner.val_dataset[0][0])  # the hold-out is read with the evaluation transform
    assert inner.holdout(0.5, seed=1).train_dataset.samples == inner.holdout(0.5, seed=1).train_dataset.samples
    with pytest.raises(ValueError, match="needs 2 or more"):
        inner.holdout(0.5).holdout(0.5)


@pytest.mark.parametrize("cache", [True, False])
def test_subsample_keeps_per_class_images_nested_and_leaves_val_alone(tmp_path, cache):
    root = make_shapes(tmp_path / "data", train_per_class=6, val_per_class=2, image_size=40)
    data = image_folders(root, IMAGENET, cache=cache, **FAST)
    small = data.subsample(2, seed=1)
    counts = [sum(1 for _, t in small.train_dataset.samples if t == c) for c in range(len(data.classes))]
    assert counts == [2] * len(data.classes) and len(small.train.dataset) == len(small.train_dataset)
    assert small.val_dataset is data.val_dataset and len(data.train_dataset) == 6 * len(data.classes)
    paths = {p for p, _ in small.train_dataset.samples}
    assert paths < {p for p, _ in data.subsample(4, seed=1).train_dataset.samples}  # nested for one seed
    assert paths == {p for p, _ in data.subsample(2, seed=1).train_dataset.samples}
    assert paths != {p for p, _ in data.subsample(2, seed=2).train_dataset.samples}
    assert len(data.subsample(100).train_dataset) == len(data.train_dataset)  # a small class keeps all it has
    images, _ = next(iter(small.train))
    assert images.shape == (4, 3, 32, 32)
    inner = small.holdout(0.5, seed=0)  # composes: 1 to train, 1 to choose on, per class
    assert len(inner.train_dataset) == len(inner.val_dataset) == len(data.classes)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="per_class"):
            data.subsample(bad)


def test_resized_shares_the_cache_and_prepares_the_new_size(shapes_root):
    data = image_folders(shapes_root, IMAGENET, **FAST)
    small = data.resized(16)
    assert small.train_dataset.images is data.train_dataset.images and small.image_size == 16
    assert next(iter(small.train))[0].shape[-2:] == (16, 16) and small.val_dataset[0][0].shape == (3, 16, 16)
    assert data.image_size == 32 and data.val_dataset[0][0].shape == (3, 32, 32)
    assert small.train_dataset.preprocessing.image_size == 16  # fit checks the normalisation, which is the same
