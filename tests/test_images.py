"""Tests for d2lft.images: every odd-but-valid image loads as RGB, every bad file raises BadImageError."""
from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from d2lft.images import IMAGE_EXTENSIONS, BadImageError, is_image_file, load_image

GRACE_HOPPER = Path(__import__("matplotlib.cbook").cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return img.getpixel(xy)  # type: ignore[return-value]


# ---------------------------------------------------------------- file names


def test_image_extensions_are_lower_case_and_cover_the_common_formats():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.jpg", True), ("A.JPEG", True), ("b.Tiff", True), ("c.webp", True), ("d.txt", False),
     ("e.jpg.part", False), ("._e.jpg", False), (".DS_Store", False), ("noext", False)],
)
def test_is_image_file(name, expected):
    assert is_image_file(Path("some/folder") / name) is expected


# ---------------------------------------------------------------- valid images in unusual modes


def test_rgb_jpeg_is_returned_fully_loaded_and_detached_from_the_file(tmp_path):
    path = _save(Image.new("RGB", (40, 30), (10, 200, 30)), tmp_path / "a.jpg", quality=95)
    img = load_image(path)
    path.unlink()  # the returned image must not need the file any more
    assert (img.mode, img.size) == ("RGB", (40, 30))
    assert np.allclose(_pixel(img, (20, 15)), (10, 200, 30), atol=3)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    img = load_image(_save(Image.new("L", (16, 16), 77), tmp_path / "g.png"))
    assert img.mode == "RGB" and _pixel(img) == (77, 77, 77)


def test_bilevel_image(tmp_path):
    img = load_image(_save(Image.new("1", (16, 16), 1), tmp_path / "b.bmp"))
    assert _pixel(img) == (255, 255, 255)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535, 1000] * 2] * 8, dtype=np.uint16)  # 32896 = 128 * 257
    path = _save(Image.fromarray(values), tmp_path / "depth.png")
    assert Image.open(path).mode == "I;16"
    img = load_image(path)
    # PIL's own convert("RGB") would clip 1000 to 255; scaling keeps it dark: 1000 / 257 ~ 4
    assert [_pixel(img, (x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_32bit_integer_tiff_with_16bit_values(tmp_path):
    values = np.array([[0, 65535]] * 8, dtype=np.int32)
    path = _save(Image.fromarray(values).resize((8, 8)), tmp_path / "i32.tif")
    assert Image.open(path).mode == "I"
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (0, 0, 0) and _pixel(img, (7, 0)) == (255, 255, 255)


def test_float_tiff(tmp_path):
    values = np.tile(np.linspace(0.0, 1.0, 8, dtype=np.float32), (8, 1))
    path = _save(Image.fromarray(values), tmp_path / "f.tif")
    img = load_image(path)
    assert _pixel(img, (0, 0)) == (0, 0, 0) and _pixel(img, (7, 0)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    path = _save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    assert np.allclose(_pixel(load_image(path)), (0, 255, 255), atol=3)  # pure cyan


def test_rgba_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    img.paste((255, 0, 0, 128), (8, 0, 16, 16))  # half-transparent red on the right
    out = load_image(_save(img, tmp_path / "logo.png"))
    assert _pixel(out, (0, 0)) == (255, 255, 255)
    assert np.allclose(_pixel(out, (12, 0)), (255, 127, 127), atol=1)


def test_la_is_composited_on_white(tmp_path):
    out = load_image(_save(Image.new("LA", (16, 16), (0, 0)), tmp_path / "la.png"))
    assert _pixel(out) == (255, 255, 255)


def test_palette_with_transparent_index(tmp_path):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 255] + [255, 0, 0] * 255)
    img.paste(1, (8, 0, 16, 16))
    out = load_image(_save(img, tmp_path / "p.gif", transparency=0))
    assert _pixel(out, (0, 0)) == (255, 255, 255)  # index 0 is transparent -> white
    assert _pixel(out, (12, 0)) == (255, 0, 0)


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 12, 34, 56] + [0, 0, 0] * 254)
    assert _pixel(load_image(_save(img, tmp_path / "p.png"))) == (12, 34, 56)


def test_rgb_png_with_transparent_colour(tmp_path):
    img = Image.new("RGB", (16, 16), (1, 2, 3))
    out = load_image(_save(img, tmp_path / "trns.png", transparency=(1, 2, 3)))
    assert _pixel(out) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    assert _pixel(load_image(path)) == (255, 0, 0)


def test_webp(tmp_path):
    img = load_image(_save(Image.new("RGB", (16, 16), (0, 128, 0)), tmp_path / "x.webp", lossless=True))
    assert _pixel(img) == (0, 128, 0)


def test_exif_orientation_is_applied_unless_disabled(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(img, tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)
    assert _pixel(upright, (10, 5))[0] > 200 and _pixel(upright, (10, 35))[0] < 50  # white half now on top
    assert "exif" not in upright.info  # applied once, never twice
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_draft_decodes_jpegs_at_reduced_scale(tmp_path):
    path = _save(Image.new("RGB", (400, 300), (90, 90, 90)), tmp_path / "big.jpg")
    assert load_image(path, draft=70).size == (100, 75)  # 1/4 scale keeps both sides >= 70
    assert load_image(path, draft=200).size == (400, 300)
    png = _save(Image.new("RGB", (400, 300)), tmp_path / "big.png")
    assert load_image(png, draft=70).size == (400, 300)  # only JPEG supports drafting


def test_the_real_placeholder_gif_loads(hymenoptera_root):
    img = load_image(hymenoptera_root / "train" / "ants" / "imageNotFound.gif")
    assert img.mode == "RGB" and img.size == (300, 300)


# ---------------------------------------------------------------- bad files


def _bad(path: Path, *, match: str, **kwargs) -> BadImageError:
    with pytest.raises(BadImageError, match=match) as info:
        load_image(path, **kwargs)
    assert str(path) in str(info.value) and info.value.path == path
    return info.value


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _bad(tmp_path / "empty.jpg", match="empty")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_truncated_file(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = io.BytesIO()
    noise.save(data, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data.getvalue()[: len(data.getvalue()) * 2 // 3])
    _bad(path, match="cannot decode|truncated|not a recognised")


def test_truncated_real_photo_fails_at_load_time_not_later(tmp_path):
    path = tmp_path / "hopper.jpg"
    path.write_bytes(GRACE_HOPPER.read_bytes()[:20_000])
    _bad(path, match="truncated")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are not pixels\n")
    _bad(tmp_path / "notes.jpg", match="not a recognised image format")


def test_html_error_page_named_jpg(tmp_path):
    (tmp_path / "403.jpg").write_text("<!DOCTYPE html><html><body>Forbidden</body></html>")
    _bad(tmp_path / "403.jpg", match="HTML")


def test_folder_named_like_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    _bad(tmp_path / "dir.jpg", match="folder")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_more_pixels_than_max_pixels_is_refused_before_decoding(tmp_path):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    _bad(path, match="max_pixels=5,000", max_pixels=5_000)
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds a single tiny IDAT: what a bomb's header looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_header_is_refused_without_touching_pil_globals(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 20_000))  # 400 M pixels: 4.4x d2lft's default limit
    _bad(path, match="decompression bomb")
    path.write_bytes(_png_header_only(100_000, 100_000))  # beyond Pillow's own hard limit as well
    _bad(path, match="decompression bomb", max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == before


def test_bomb_between_pil_warning_and_error_limits_gives_no_warning(tmp_path, recwarn):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(10_000, 10_000))  # 100 M: above PIL's warning level
    _bad(path, match="max_pixels")
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_tiny_images_are_refused_below_min_size(tmp_path):
    path = _save(Image.new("RGB", (1, 1)), tmp_path / "pixel.gif")
    err = _bad(path, match="1x1 pixels, below min_size=8")
    assert "Delete or replace" in str(err)
    assert load_image(path, min_size=1).size == (1, 1)
    assert load_image(_save(Image.new("RGB", (8, 100)), tmp_path / "thin.png")).size == (8, 100)


def test_bad_image_error_is_a_value_error_and_pickles():
    err = BadImageError("x/y.jpg", "the file is empty")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError) and str(again) == str(err) and again.reason == err.reason


# ---------------------------------------------------------------- fuzzing: RGB or BadImageError, nothing else

MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"BM", b"RIFF\0\0\0\0WEBPVP8 ",
         b"II*\0", b"MM\0*", b""]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check_contract(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        img = load_image(path, min_size=1)
    except BadImageError as err:
        assert str(path) in str(err)
    else:
        assert img.mode == "RGB" and min(img.size) >= 1


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.img"


@FUZZ
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=2048))
def test_fuzz_random_bytes_behind_real_magic_numbers(fuzz_file, magic, tail):
    _check_contract(fuzz_file, magic + tail)


@FUZZ
@given(
    cut=st.integers(min_value=0, max_value=GRACE_HOPPER.stat().st_size),
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), max_size=8),
)
def test_fuzz_truncated_and_mutated_real_jpeg(fuzz_file, cut, flips):
    data = bytearray(GRACE_HOPPER.read_bytes()[:cut])
    for position, xor in flips:  # mutate the headers, where the decoders make their decisions
        if position < len(data):
            data[position] ^= xor
    _check_contract(fuzz_file, bytes(data))


def _encoded(fmt: str, **kwargs) -> bytes:
    small = Image.open(GRACE_HOPPER).resize((48, 36))
    data = io.BytesIO()
    (small.convert("P") if "transparency" in kwargs else small).save(data, fmt, **kwargs)
    return data.getvalue()


ENCODED = {name: _encoded(fmt, **kw) for name, fmt, kw in [
    ("png", "PNG", {}), ("gif", "GIF", {}), ("tiff", "TIFF", {}), ("webp", "WEBP", {}), ("bmp", "BMP", {}),
    ("png-palette-transparent", "PNG", {"transparency": 0})]}


@FUZZ
@given(
    name=st.sampled_from(sorted(ENCODED)),
    keep=st.floats(min_value=0.0, max_value=1.0),
    flips=st.lists(st.tuples(st.integers(0, 2047), st.integers(1, 255)), max_size=8),
)
def test_fuzz_truncated_and_mutated_other_formats(fuzz_file, name, keep, flips):
    data = bytearray(ENCODED[name][: round(len(ENCODED[name]) * keep)])
    for position, xor in flips:
        if position < len(data):
            data[position] ^= xor
    _check_contract(fuzz_file, bytes(data))


# Issue 11, defect 2: a long, thin image stays under max_pixels but must not be decoded (nor resized).


def thin_png(path: Path, width: int, height: int = 8) -> Path:
    """A valid all-black grayscale PNG of width x height, written row by row (85 KB for 11,000,000 x 8)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), bytes(width + 1)  # filter byte 0, then `width` black pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width", [11_000_000, 1_000_000])
def test_long_thin_image_is_refused_from_its_header(tmp_path, width):
    path = thin_png(tmp_path / "strip.png", width)
    assert path.stat().st_size < 100_000
    err = _bad(path, match=rf"{width}x8 pixels \({width * 8 / 1e6:,.0f} MB decoded\), an aspect ratio of "
                           rf"{width // 8:,}:1 beyond max_aspect=50")
    assert "max_aspect=None" in str(err)
    assert load_image(thin_png(tmp_path / "band.png", 400), max_aspect=None).size == (400, 8)
    assert load_image(thin_png(tmp_path / "ok.png", 400), max_aspect=50).size == (400, 8)


def test_long_thin_image_costs_no_memory(tmp_path):
    # In a fresh process (this one's peak is whatever earlier tests reached): refusing the
    # 11,000,000 x 8 PNG must not raise the peak resident memory by the 88-264 MB a decode costs.
    import subprocess
    import sys

    path = thin_png(tmp_path / "strip.png", 11_000_000)
    images_py = Path(__file__).resolve().parent.parent / "d2lft" / "images.py"
    script = (
        "import importlib.util, resource, sys\n"
        f"spec = importlib.util.spec_from_file_location('images', {str(images_py)!r})\n"
        "images = importlib.util.module_from_spec(spec); spec.loader.exec_module(images)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"try:\n    images.load_image({str(path)!r})\n    print('accepted')\n"
        "except images.BadImageError as err:\n    print(err)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    message, grown_mb = out.strip().splitlines()
    assert "max_aspect" in message, message
    assert int(grown_mb) < 50, f"peak memory grew by {grown_mb} MB while refusing the image"


# Issue 11, defect 5: one walk of a folder, in ImageFolder's order, each file and folder once.


def test_scan_images_lists_what_imagefolder_lists_in_the_same_order(tmp_path):
    from torchvision.datasets.folder import make_dataset

    from d2lft.images import scan_images

    for rel in ["b.jpg", "a.png", "sub/z.jpg", "sub/deeper/y.JPG", "sub-2/x.webp", "A/w.jpg"]:
        (tmp_path / "cls" / rel).parent.mkdir(parents=True, exist_ok=True)
        _save(Image.new("RGB", (8, 8)), tmp_path / "cls" / rel, format="PNG")
    reference = [p for p, _ in make_dataset(str(tmp_path), {"cls": 0}, extensions=tuple(IMAGE_EXTENSIONS))]
    files, skipped = scan_images(tmp_path / "cls")
    assert files == reference and skipped == []


def test_scan_images_reads_a_folder_reached_twice_once(tmp_path):
    from d2lft.images import scan_images

    (tmp_path / "real").mkdir()
    _save(Image.new("RGB", (8, 8)), tmp_path / "real" / "0.png")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "up").symlink_to(tmp_path)  # a loop through the parent
    files, skipped = scan_images(tmp_path)
    assert len(files) == 1
    assert files == [str(tmp_path / "real" / "0.png")]
    assert sorted(Path(name).name for name, _ in skipped) == ["link", "up"]
