"""Robust image loading: every image d2lft reads goes through :func:`load_image`.

A folder of photos from the web holds surprises: empty or truncated downloads, HTML error pages saved as
``.jpg``, CMYK JPEGs, 16-bit PNGs, transparent logos, animated GIFs, 1-pixel trackers and the odd
decompression bomb. :func:`load_image` turns each file into a fully decoded RGB ``PIL.Image`` or raises
:class:`BadImageError` naming the file and the reason, so a bad file fails *here*, once, with a message,
not later inside a DataLoader worker.

>>> from d2lft.images import is_image_file
>>> is_image_file("train/ants/0013035.JPG"), is_image_file("notes.txt")
(True, False)
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from d2lft.errors import D2LFTError

__all__ = [
    "IMAGE_EXTENSIONS", "BadImageError", "DuplicateImageWarning", "is_image_file", "load_image", "printable_path",
    "scan_images", "shared_files",
]

#: File name endings read as images in data folders and by `is_image_file` (compared in lower case):
#: the one list d2lft uses, the same as torchvision's ImageFolder less its rare .ppm/.pgm. GIFs are
#: left out: in photo folders they are animations and placeholders (ants/bees' ``imageNotFound.gif``);
#: `load_image` still reads one when asked, and ``image_folders(extensions=...)`` can add them.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

#: How `scan_images` says a file was left out for its type (``d2lft.data`` groups such files in its report).
NOT_READ = "is not an image type read here"

#: Same default as ``PIL.Image.MAX_IMAGE_PIXELS`` (about 9459 x 9459): bigger images are refused.
DEFAULT_MAX_PIXELS = 89_478_485

#: Images whose longer side is more than this many times their shorter side are refused by default: a
#: banner or strip is no photo, and resizing its shorter side to the model's input size multiplies the
#: longer one (an 11,000,000 x 8 PNG of 85 KB would become a 250-megapixel image at 183 px).
DEFAULT_MAX_ASPECT = 50

#: Images whose shorter side is below this many pixels are refused by default (see :func:`load_image`).
DEFAULT_MIN_SIZE = 8

_HIGH_BIT_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TO_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadImageError(D2LFTError, ValueError):
    """A file that cannot be used as an image; ``.path`` and ``.reason`` say which and why.

    >>> err = BadImageError("cat.jpg", "the file is empty (0 bytes)")
    >>> print(err)
    cat.jpg: the file is empty (0 bytes). Delete or replace this file.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}. Delete or replace this file.")

    def __reduce__(self):  # keep the exception picklable (DataLoader workers send errors between processes)
        return (type(self), (str(self.path), self.reason))


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when the name ends in one of :data:`IMAGE_EXTENSIONS` and is not a hidden file.

    Hidden names are excluded because macOS leaves ``._photo.jpg`` metadata twins in zip files.

    >>> is_image_file("a/b.PnG"), is_image_file("a/._b.png"), is_image_file("a/b.gif.txt")
    (True, False, False)
    """
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    max_aspect: float | None = DEFAULT_MAX_ASPECT,
    exif_transpose: bool = True,
    draft: int | None = None,
) -> Image.Image:
    """Read ``path`` into a fully decoded RGB image, or raise :class:`BadImageError` saying why.

    Conversions: grayscale and bilevel are copied to three channels; 16-bit images are scaled to 8 bits
    (65535 -> 255; 32-bit integer or float images outside the 16-bit / [0, 1] range are stretched to their
    own min..max); CMYK and palette images are converted; anything with transparency (RGBA, LA, palette or
    RGB with a transparent colour) is composited on white; an animated GIF/WebP gives its first frame;
    the EXIF orientation of phone photos is applied unless ``exif_transpose=False``.

    Refused with :class:`BadImageError`: empty, truncated or corrupt files, files that are no image at all,
    images with more than ``max_pixels`` pixels (checked from the header, *before* decoding, so a
    decompression bomb costs nothing; ``None`` disables d2lft's check, but Pillow itself still refuses
    images over twice ``PIL.Image.MAX_IMAGE_PIXELS``, which d2lft never changes), and images whose shorter
    side is below ``min_size`` pixels (default 8: such files are icons, spacers and tracking pixels, not
    photos, and a network that downsamples 32x sees nothing in them; pass ``min_size=1`` to accept them).
    Images whose longer side is more than ``max_aspect`` times the shorter one (default 50: a strip, not a
    photo; ``None`` accepts any shape) are refused from the header too, so a thin image that stays under
    ``max_pixels`` is never decoded and then blown up by a resize.
    A missing file raises ``FileNotFoundError``. Note that truncated files only fail if nobody set the
    global ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True``.

    ``draft=s`` lets the JPEG decoder skip detail it would throw away: the image is decoded at 1/2, 1/4 or
    1/8 scale while both sides stay >= ``s`` pixels (3.5x faster for a 6-megapixel photo cached at 183 px).

    >>> import tempfile
    >>> from PIL import Image
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     Image.new("LA", (32, 16), (0, 0)).save(f"{tmp}/logo.png")   # fully transparent
    ...     img = load_image(f"{tmp}/logo.png")
    >>> img.mode, img.size, img.getpixel((0, 0))
    ('RGB', (32, 16), (255, 255, 255))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no image at {path}: check the path (is the dataset extracted there?)")
    if path.is_dir():
        raise BadImageError(path, "this is a folder, not an image file")
    try:
        file_size = path.stat().st_size
    except OSError as err:
        raise BadImageError(path, f"cannot read the file ({err.strerror or err})") from err
    if file_size == 0:
        raise BadImageError(path, "the file is empty (0 bytes), probably an interrupted download")

    # Pillow's decoders raise a zoo of exception types on corrupt input (OSError, SyntaxError,
    # struct.error, IndexError, ValueError, MemoryError, ...); inside this block every one of them means
    # "this file is bad", so each becomes a BadImageError that names the file.
    try:
        with warnings.catch_warnings():
            # Pillow warns about what we handle here (its global bomb limit, which d2lft replaces by
            # `max_pixels`; palette transparency; corrupt EXIF or TIFF tags): the caller gets either a
            # clean RGB image or one BadImageError, never a stream of warnings from a data loader.
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                _check_size(path, img, max_pixels=max_pixels, min_size=min_size, max_aspect=max_aspect)
                if getattr(img, "is_animated", False):
                    img.seek(0)
                if draft is not None and img.format == "JPEG":
                    img.draft(img.mode, (draft, draft))
                img.load()  # decode everything now, so truncated files fail here
                rgb = _to_rgb(img)
                if exif_transpose:
                    rgb = _apply_orientation(rgb, _orientation(img))
    except BadImageError:
        raise
    except Image.UnidentifiedImageError as err:
        raise BadImageError(path, _describe_unknown(path)) from err
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"too many pixels, could be a decompression bomb ({err})") from err
    except Exception as err:  # noqa: BLE001 - see the comment above the try
        raise BadImageError(path, f"cannot decode the image: {_reason(err)}") from err
    if rgb.mode != "RGB":  # defensive: every branch of _to_rgb ends in RGB
        raise BadImageError(path, f"could not convert mode {rgb.mode} to RGB")
    return rgb


def _check_size(path: Path, img: Image.Image, *, max_pixels: int | None, min_size: int,
                max_aspect: float | None) -> None:
    """Refuse from the header (``Image.open`` has read only that) what must not be decoded."""
    width, height = img.size
    pixels = width * height
    decoded = f"{pixels * len(img.getbands()) / 1e6:,.0f} MB decoded"
    if max_pixels is not None and pixels > max_pixels:
        raise BadImageError(
            path,
            f"{width}x{height} = {pixels:,} pixels ({decoded}) exceeds max_pixels={max_pixels:,} "
            "(could be a decompression bomb; pass a larger max_pixels if you trust the file)",
        )
    if min(width, height) < min_size:
        raise BadImageError(
            path, f"the image is only {width}x{height} pixels, below min_size={min_size} (an icon or placeholder?)"
        )
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise BadImageError(
            path,
            f"the image is {width}x{height} pixels ({decoded}), an aspect ratio of "
            f"{max(width, height) / max(min(width, height), 1):,.0f}:1 beyond max_aspect={max_aspect:g} "
            "(a strip or banner, not a photo; pass max_aspect=None if you trust the file)",
        )


def _orientation(img: Image.Image) -> object:
    """The EXIF orientation tag, or None; corrupt EXIF only loses the tag, the pixels are still fine."""
    try:
        return img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001 - any EXIF parsing failure
        return None


def _apply_orientation(img: Image.Image, orientation: object) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag asks (phones store photos sideways plus this tag)."""
    method = _ORIENTATION_TO_TRANSPOSE.get(orientation)  # type: ignore[call-overload]
    img.info.pop("exif", None)  # the orientation is applied; do not let anyone apply it twice
    return img if method is None else img.transpose(method)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to RGB (see :func:`load_image` for the rules)."""
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        return _to_8bit(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB (a copy) ...


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float single-channel image to 8-bit grayscale ("L")."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    if img.mode.startswith("I;16") or (img.mode == "I" and low >= 0 and high <= 65535):
        white = 65535.0
    elif img.mode == "F" and low >= 0 and high <= 1:
        white = 1.0
    else:  # no standard white level: stretch to the image's own range
        values = values - low
        white = max(high - low, 1e-12)
    scaled = np.clip(np.rint(values * (255.0 / white)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _describe_unknown(path: Path) -> str:
    with path.open("rb") as file:
        head = file.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "this is an HTML/XML page, not an image (a failed download or an error page saved as an image)"
    return f"not a recognised image format (first bytes: {head[:16]!r})"


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if "truncated" in text or isinstance(err, EOFError):
        return f"the file is truncated ({text}), probably an interrupted download"
    return f"{type(err).__name__}: {text}"


# ------------------------------------------------------------------------------------- folders


class DuplicateImageWarning(UserWarning):
    """The same file (through a link) is in two splits, e.g. a validation image also in train/."""


def printable_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a str that can always be printed and written to JSON.

    A file name that is not valid UTF-8 comes back from ``os.scandir`` with surrogate escapes, which
    ``print`` and UTF-8 files refuse; here its odd bytes are shown as ``\\xNN``.

    >>> printable_path(os.fsdecode(b"caf\\xe9.jpg"))
    'caf\\\\xe9.jpg'
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def scan_images(
    folder: str | os.PathLike[str], *, extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[tuple[str, str]]]:
    """Walk ``folder`` once: ``(image files, skipped)``, where skipped holds ``(name, reason)`` pairs.

    Links to folders are followed, but every folder and file is read once (by its resolved identity), so
    a link loop such as ``ln -s . self`` adds nothing. Hidden files and folders (``.ipynb_checkpoints``,
    ``.DS_Store``, macOS ``._`` twins) are ignored. Reported in ``skipped``, not raised: dangling links,
    files that are not regular files (a pipe named ``.jpg`` would block a reader), files whose name does
    not end in one of ``extensions``, a second link to a file already listed, and sub-folders that cannot
    be read. Files are paths under ``folder`` (the order of ``torchvision.datasets.ImageFolder``: each
    folder's files sorted, folders sorted by path); skipped names are :func:`printable_path` strings.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for name in ("b.jpg", "a.png", "notes.txt"):
    ...         _ = Path(tmp, name).write_bytes(b"")
    ...     os.symlink(".", Path(tmp, "loop"))
    ...     files, skipped = scan_images(tmp)
    >>> [Path(f).name for f in files], [Path(name).name for name, reason in skipped]
    (['a.png', 'b.jpg'], ['loop', 'notes.txt'])
    """
    wanted = tuple(e.lower() for e in extensions)
    top = os.fspath(folder)
    seen_folders: dict[tuple[int, int], str] = {}
    seen_files: dict[tuple[int, int], str] = {}
    found: list[tuple[str, list[str]]] = []
    skipped: list[tuple[str, str]] = []
    try:
        info = os.stat(top)
    except OSError as err:
        return [], [(printable_path(top), f"cannot read this folder ({err.strerror or err})")]
    seen_folders[(info.st_dev, info.st_ino)] = top
    pending = [top]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as it:
                # Real entries before links, so a folder or file reached both ways is listed under its own name.
                entries = sorted(it, key=lambda e: (e.is_symlink(), e.name))
        except OSError as err:
            skipped.append((printable_path(current), f"cannot read this folder ({err.strerror or err})"))
            continue
        files = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = entry.path
            try:
                info = entry.stat()  # follows links
            except OSError as err:
                reason = (f"a link to {printable_path(os.readlink(path))!r}, which does not exist"
                          if entry.is_symlink() else f"cannot read it ({err.strerror or err})")
                skipped.append((printable_path(path), reason))
                continue
            identity = (info.st_dev, info.st_ino)
            if entry.is_dir():
                if identity in seen_folders:
                    skipped.append((printable_path(path), f"the same folder as {printable_path(seen_folders[identity])}"
                                                          ", already read (a link loop?): not read again"))
                else:
                    seen_folders[identity] = path
                    pending.append(path)
            elif not entry.is_file():
                skipped.append((printable_path(path), "not a regular file (a pipe, socket or device)"))
            elif not entry.name.lower().endswith(wanted):
                suffix = Path(entry.name).suffix or "no extension"
                skipped.append((printable_path(path), f"{printable_path(suffix)} {NOT_READ} "
                                                      f"({' '.join(wanted)}); pass extensions=... to read it"))
            elif identity in seen_files:
                skipped.append((printable_path(path), f"the same file as {printable_path(seen_files[identity])} "
                                                      "(a link): read once"))
            else:
                seen_files[identity] = path
                files.append(path)
        found.append((current, sorted(files)))
    found.sort(key=lambda item: item[0])  # ImageFolder's order: folders by path, each one's files by name
    skipped.sort()
    return [path for _, files in found for path in files], skipped


def typical_size(folder: str | os.PathLike[str], *, samples: int = 32) -> int | None:
    """The median shorter side, in pixels, of up to `samples` images spread over `folder` (None: no readable image).

    Only the files' headers are read. `d2lft finetune` uses it to pick its image size.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for i, size in enumerate([(64, 64), (80, 60), (200, 100)]):
    ...         Image.new("RGB", size).save(Path(tmp, f"{i}.png"))
    ...     typical_size(tmp)
    64
    """
    files, _ = scan_images(folder)
    if not files:
        return None
    step = max(1, len(files) // samples)
    sides = []
    for path in files[::step][:samples]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # image_folders reports unreadable files, once each
    return sorted(sides)[len(sides) // 2] if sides else None


def shared_files(*groups: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` of paths from two different groups that are the same file (links or hard links).

    The groups are splits (a validation image linked into train/) or class folders (one image under two
    labels); ``a`` is from the earlier group.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = Path(tmp, "a.jpg").write_bytes(b"")
    ...     os.symlink(Path(tmp, "a.jpg"), Path(tmp, "b.jpg"))
    ...     [(Path(a).name, Path(b).name) for a, b in shared_files([f"{tmp}/a.jpg"], [f"{tmp}/b.jpg"])]
    [('a.jpg', 'b.jpg')]
    """
    first_seen: dict[tuple[int, int], tuple[int, str]] = {}
    pairs = []
    for number, group in enumerate(groups):
        for path in group:
            try:
                info = os.stat(path)
            except OSError:
                continue
            group_and_path = first_seen.setdefault((info.st_dev, info.st_ino), (number, path))
            if group_and_path[0] != number:
                pairs.append((group_and_path[1], path))
    return pairs
