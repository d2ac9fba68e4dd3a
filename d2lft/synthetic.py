"""The embedded dataset "shapes": a small, deterministic ImageFolder tree made without network.

Each picture holds one object (circle, triangle, square, star or cross) in a random colour, size,
position and rotation, on a textured, noisy background with a few distractor strokes. That is
hard enough that a network trained from scratch on ~25 pictures per class does poorly, while an
ImageNet-pretrained backbone, which already knows edges, corners and textures, does well: the
course's point in miniature. Each split also has a ``targets.csv`` with the object's size, a
continuous target for the regression examples.

``make_shapes(root, shifted=True)`` writes the same scenes as another sensor would record them
(``root/shapes_shifted``): false colours, an edge channel, half the resolution and noise. The
labels and the layout are the same; the pixels are far from any photo, which makes it the
offline stand-in for a domain far from ImageNet (satellite tiles, in chapter 5).

Layout (an ordinary ImageFolder tree)::

    root/shapes/train/<class>/000.png ...   root/shapes/train/targets.csv
    root/shapes/val/<class>/000.png ...     root/shapes/val/targets.csv
    root/shapes/manifest.json               written last: marks a complete generation
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from d2lft.errors import ConfigError

__all__ = ["CLASSES", "FOLDER", "SHIFTED_FOLDER", "TARGET_NAME", "make_shapes"]

CLASSES = ("circle", "cross", "square", "star", "triangle")
FOLDER = "shapes"
SHIFTED_FOLDER = "shapes_shifted"  # the same scenes through another sensor (shifted=True)
TARGET_NAME = "size"  # column of targets.csv: the object's diameter as a fraction of the image side
MANIFEST = "manifest.json"
_VERSION = 1  # bump when the drawing changes, so old caches are regenerated
_SUPERSAMPLE = 3  # draw large, then downsample: smooth edges like a photo


def make_shapes(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    image_size: int = 96,
    train_per_class: int = 24,
    val_per_class: int = 20,
    shifted: bool = False,
    force: bool = False,
) -> Path:
    """Generate (or reuse) the "shapes" ImageFolder tree under ``root/shapes`` and return its path.

    The same arguments always give the same bytes. A finished tree is reused; one left
    half-written (no manifest) or made with other arguments is generated again. With
    ``shifted=True`` the same scenes are recorded through another sensor (false colours, an edge
    channel, half the resolution, noise) into ``root/shapes_shifted``: a domain shift with the
    labels unchanged.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = make_shapes(tmp, train_per_class=2, val_per_class=1, image_size=32)
        ...     shifted = make_shapes(tmp, train_per_class=2, val_per_class=1, image_size=32, shifted=True)
        ...     sorted(p.name for p in (path / "train").iterdir()), shifted.name
        (['circle', 'cross', 'square', 'star', 'targets.csv', 'triangle'], 'shapes_shifted')
    """
    for name, value in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if value < 1:
            raise ConfigError(f"make_shapes: {name} must be at least 1, got {value}")
    if image_size < 16:
        raise ConfigError(f"make_shapes: image_size must be at least 16 pixels, got {image_size}")
    root = Path(root).expanduser()
    folder = root / (SHIFTED_FOLDER if shifted else FOLDER)
    settings = {
        "version": _VERSION,
        "seed": seed,
        "image_size": image_size,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "classes": list(CLASSES),
    }
    if shifted:  # only then: a "shapes" tree made before this option existed is still reused
        settings["shifted"] = True
    if not force and _read_manifest(folder) == settings:
        return folder
    if folder.exists() and not _looks_generated(folder):
        raise FileExistsError(
            f"{folder} exists but was not made by make_shapes (it holds other files); "
            f"move it away or pass another root"
        )
    root.mkdir(parents=True, exist_ok=True)
    # Build in a hidden sibling and rename at the end, so `folder` is never seen half-written.
    staging = Path(tempfile.mkdtemp(prefix=".shapes-", dir=root))
    try:
        for split_index, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
            _write_split(staging / split, split_index, per_class, seed=seed, image_size=image_size, shifted=shifted)
        (staging / MANIFEST).write_text(json.dumps(settings, indent=1) + "\n")  # last: marks completion
        # Under torchrun every process may generate at once: the first to finish wins, and the
        # others keep its tree (same arguments, same bytes) instead of replacing it under its readers.
        if not force and _read_manifest(folder) == settings:
            return folder
        if folder.exists():
            shutil.rmtree(folder)
        try:
            os.replace(staging, folder)
        except OSError:
            if _read_manifest(folder) != settings:  # not another process's finished tree: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _looks_generated(folder: Path) -> bool:
    """True when every file under `folder` is something make_shapes writes (safe to replace)."""
    if not folder.is_dir():
        return False
    if not {p.name for p in folder.iterdir()} <= {"train", "val", MANIFEST}:
        return False
    return all(p.suffix in {".png", ".csv", ".json"} for p in folder.rglob("*") if p.is_file())


def _write_split(folder: Path, split_index: int, per_class: int, *, seed: int, image_size: int,
                 shifted: bool = False) -> None:
    rows = []
    for class_index, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            # One independent stream per picture: a picture does not depend on how many come before it.
            rng = np.random.default_rng([seed, split_index, class_index, i])
            image, size = _draw(rng, name, image_size)
            if shifted:
                image = _through_another_sensor(rng, image)
            relative = f"{name}/{i:03d}.png"
            image.save(folder / relative, optimize=False)
            rows.append((relative, name, f"{size:.4f}"))
    with open(folder / "targets.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "class", TARGET_NAME])
        writer.writerows(rows)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour blobs plus a random texture (stripes or speckle): float RGB, shape (size, size, 3)."""
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and frequency
        angle, freq = rng.uniform(0, math.pi), rng.uniform(4, 12)
        texture = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    elif kind == 1:  # checker-like grid
        freq = rng.uniform(3, 8)
        texture = np.sign(np.sin(2 * math.pi * freq * xx) * np.sin(2 * math.pi * freq * yy))
    else:  # blurred speckle
        speckle = Image.fromarray(rng.integers(0, 256, size=(size // 3, size // 3), dtype=np.uint8))
        speckle = speckle.resize((size, size), Image.BILINEAR)
        texture = np.asarray(speckle, dtype=np.float32) / 127.5 - 1
    strength = rng.uniform(10, 35)
    return base * 0.7 + 40 + strength * texture[..., None]


def _polygon(name: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of the class shape inscribed in a circle of `radius` (circle is handled by the caller)."""
    if name == "triangle":
        radii, count = [radius], 3
    elif name == "square":
        radii, count = [radius], 4
    elif name == "star":
        radii, count = [radius, radius * 0.42], 10
    elif name == "cross":  # a plus sign with arms 0.36 * diameter wide
        w = 0.36 * radius
        r = radius / math.hypot(1, 0.36)
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r),
                   (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]
    else:
        raise ConfigError(f"unknown shape {name!r}; expected one of {CLASSES}")
    return [
        (
            cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / count),
            cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / count),
        )
        for k in range(count)
    ]


def _colour(rng: np.random.Generator, avoid: np.ndarray) -> tuple[int, int, int]:
    """A random saturated colour that differs clearly from `avoid` (the local background)."""
    for _ in range(50):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - avoid).sum() > 180:
            break
    return tuple(int(v) for v in colour)


def _draw(rng: np.random.Generator, name: str, size: int) -> tuple[Image.Image, float]:
    """One picture of class `name` and the object's size (diameter / image side)."""
    big = size * _SUPERSAMPLE
    background = _background(rng, size)
    canvas = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).resize((big, big), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)

    for _ in range(rng.integers(2, 6)):  # distractors: thin strokes and small dots, never a class shape
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, big, size=4))
        if rng.random() < 0.6:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)) * _SUPERSAMPLE)
        else:
            r = rng.uniform(0.02, 0.05) * big
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)

    diameter = float(rng.uniform(0.3, 0.75))
    radius = diameter * big / 2
    cx, cy = (float(v) for v in rng.uniform(radius, big - radius, size=2))
    angle = float(rng.uniform(0, 2 * math.pi))
    local = background[int(cy / _SUPERSAMPLE), int(cx / _SUPERSAMPLE)]
    fill = _colour(rng, local)
    outline = tuple(int(v) for v in rng.integers(0, 256, size=3)) if rng.random() < 0.5 else None
    width = int(rng.integers(1, 3)) * _SUPERSAMPLE
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(name, cx, cy, radius, angle), fill=fill, outline=outline, width=width)

    image = canvas.resize((size, size), Image.LANCZOS).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6)))
    noise = rng.normal(0, rng.uniform(1, 5), size=(size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), diameter


def _through_another_sensor(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """The same scene in false colours: inverted brightness, an edge channel and a blurred one,
    recorded at half the resolution with sensor noise (nothing like an ImageNet photo)."""
    size = image.size[0]
    low = image.convert("L").resize((max(8, size // 2),) * 2, Image.BILINEAR).resize((size, size), Image.BILINEAR)
    grey = np.asarray(low, dtype=np.float32)
    edges = np.asarray(low.filter(ImageFilter.FIND_EDGES), dtype=np.float32) * 3
    blurred = np.asarray(low.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)
    channels = np.stack([255 - grey, edges, 0.5 * blurred + 60], axis=-1)
    noisy = channels + rng.normal(0, 8, size=channels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
