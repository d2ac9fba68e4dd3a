"""Downloads that are verified before they are trusted, and archive extraction that cannot escape its folder.

``download_url`` streams into ``<dest>.part``, checks the SHA-1 and only then renames the file into place, so
a file at ``dest`` is always complete. ``extract_archive`` refuses members that would land outside the target
folder (zip-slip) and extracts into a hidden temporary folder first, so a crash never leaves a half-extracted
dataset that passes for complete.

>>> import hashlib, tempfile
>>> from pathlib import Path
>>> with tempfile.TemporaryDirectory() as tmp:
...     Path(tmp, "hello.txt").write_text("hello")
...     sha1sum(Path(tmp, "hello.txt")) == hashlib.sha1(b"hello").hexdigest()
5
True
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from d2lft import env
from d2lft.errors import ConfigError, D2LFTError

__all__ = ["DownloadError", "UnsafeArchiveError", "download_url", "extract_archive", "sha1sum"]

_CHUNK = 1 << 20
_SCHEMES = {"http", "https", "ftp", "file"}
_JUNK_NAMES = {".DS_Store", "Thumbs.db"}
_TAR_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # Python >= 3.11.4 / 3.10.12


class DownloadError(D2LFTError, RuntimeError):
    """A download or an archive that could not be used; the message says what to do instead."""


class UnsafeArchiveError(DownloadError):
    """An archive member that would be written outside the target folder (zip-slip), or a link out of it."""


def sha1sum(path: str | os.PathLike[str], *, chunk_size: int = _CHUNK) -> str:
    """The SHA-1 of a file as 40 lower-case hex digits, read in chunks (big files are fine).

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     sha1sum(f.name)
    'da39a3ee5e6b4b0d3255bfef95601890afd80709'
    """
    digest = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha1(sha1: str | None) -> str | None:
    if sha1 is None:
        return None
    value = sha1.strip().lower()
    if len(value) != 40 or any(c not in "0123456789abcdef" for c in value):
        raise ConfigError(f"sha1={sha1!r} is not a SHA-1 hex digest (expected 40 hex digits, or None)")
    return value


def _by_hand(url: str, dest: Path) -> str:
    return f"download it by hand (a browser works) and save it as {dest}"


def download_url(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha1: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    offline: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest`` (verified against ``sha1`` when given) and return ``dest``.

    The bytes go to ``<dest>.part`` (a stale one from an interrupted run is overwritten, never trusted),
    the SHA-1 is computed while streaming, and only a complete, verified file is renamed to ``dest``
    (``os.replace``: atomic). A ``dest`` that already exists is reused without network access when its
    SHA-1 matches (or when no ``sha1`` is given); one with the wrong SHA-1 is downloaded again.
    ``offline`` defaults to ``d2lft.env.offline()`` ($D2LFT_OFFLINE): then nothing is fetched and
    :class:`DownloadError` says how to provide the file by hand. So does any network failure, and a
    download that ends before its announced length. A wrong checksum deletes the download and raises
    :class:`DownloadError` naming the URL, the file and both hashes.

    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     download_url("https://example.org/x.zip", Path(tmp, "x.zip"), offline=True)
    Traceback (most recent call last):
    ...
    d2lft.download.DownloadError: working offline ($D2LFT_OFFLINE or offline=True): not downloading https://...
    """
    dest = Path(dest)
    expected = _check_sha1(sha1)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(f"url={url!r}: expected an http(s), ftp or file URL")
    if timeout <= 0:
        raise ConfigError(f"timeout={timeout!r}: expected a positive number of seconds")

    if dest.is_file() and (expected is None or sha1sum(dest) == expected):
        return dest
    if env.offline() if offline is None else offline:
        raise DownloadError(f"working offline ($D2LFT_OFFLINE or offline=True): not downloading {url}; "
                            f"{_by_hand(url, dest)}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        actual = _stream(url, part, dest=dest, progress=progress, timeout=timeout)
        if expected is not None and actual != expected:
            raise DownloadError(
                f"checksum mismatch for {url}: the downloaded file {dest} has SHA-1 {actual}, expected {expected}. "
                f"The file was deleted; try again later (the server may have sent an error page or a changed "
                f"file), or {_by_hand(url, dest)}"
            )
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)  # never leave bytes behind that a later run could mistake for data
        raise
    return dest


def _stream(url: str, part: Path, *, dest: Path, progress: bool, timeout: float) -> str:
    """Copy ``url`` into ``part`` (truncating it), returning the SHA-1 of the bytes received."""
    digest = hashlib.sha1(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": "d2lft (+https://pypi.org/project/d2lft)"})
    received = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            # disable=None: tqdm shows the bar on a terminal or in a notebook, not in logs or under pytest.
            with part.open("wb") as file, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                disable=None if progress else True, leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"the server answered HTTP {err.code} ({err.reason}) for {url}; try again later, or {_by_hand(url, dest)}"
        ) from err
    # Network failures only: an OSError while writing `part` (a full disk) is not the network's fault.
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(
            f"could not download {url}: {reason} (after {received:,} bytes); check your internet connection "
            f"or proxy and try again, or {_by_hand(url, dest)}"
        ) from err
    if total is not None and received != total:
        raise DownloadError(
            f"the download of {url} stopped after {received:,} of {total:,} bytes (connection closed early); "
            f"nothing was kept; try again, or {_by_hand(url, dest)}"
        )
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ archives


def extract_archive(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Extract a .zip or .tar(.gz/.bz2/.xz) ``archive`` into the folder ``dest``; return what it made.

    Returns ``dest/<name>`` when the archive holds a single top-level folder (the usual dataset layout,
    e.g. ``hymenoptera_data/``), else ``dest``. Every member is checked *before* anything is written:
    absolute names, ``..`` components and links that point outside ``dest`` raise
    :class:`UnsafeArchiveError` naming the member (zip files may not contain symlinks at all; tar files are
    additionally extracted with Python's ``"data"`` filter). macOS junk (``__MACOSX/``, ``.DS_Store``) is
    skipped. Members are extracted into a hidden temporary folder inside ``dest`` and each top-level entry
    is then renamed into place, so an interrupted run leaves no half-extracted dataset behind. An existing
    top-level entry is an error unless ``overwrite=True`` (then it is replaced).

    >>> import tempfile, zipfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with zipfile.ZipFile(Path(tmp, "d.zip"), "w") as zf:
    ...         zf.writestr("shapes/train/a/0.txt", "x")
    ...     extract_archive(Path(tmp, "d.zip"), Path(tmp, "data")).relative_to(tmp).as_posix()
    'data/shapes'
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"no archive at {archive}")
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}.extracting-", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, staging)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, staging)
        else:
            raise DownloadError(
                f"{archive} is neither a zip nor a tar archive (an error page saved under an archive name?): "
                "delete it and download it again"
            )
        entries = sorted(staging.iterdir())
        existing = [dest / entry.name for entry in entries if os.path.lexists(dest / entry.name)]
        if existing and not overwrite:  # checked for all entries before any is moved
            raise DownloadError(
                f"{existing[0]} already exists, so {archive} was not extracted over it: delete it "
                "(or pass overwrite=True) and extract again"
            )
        for entry in entries:
            target = dest / entry.name
            if os.path.lexists(target):
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if len(entries) == 1 and (dest / entries[0].name).is_dir():
        return dest / entries[0].name
    return dest


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and (parts[0] == "__MACOSX" or parts[-1] in _JUNK_NAMES)


def _check_name(archive: Path, name: str) -> None:
    """Refuse member names that are absolute or climb out with ``..`` (on any platform's separators)."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the target folder (absolute path or '..'); "
            "refusing to extract anything from this archive. Do not use it: download it again from the "
            "original source"
        )


def _check_link(archive: Path, name: str, target: str, *, relative_to_member: bool) -> None:
    """Refuse a link whose target, resolved inside the archive, leaves it."""
    base = PurePosixPath(name).parent if relative_to_member else PurePosixPath()
    resolved = os.path.normpath(str(base / target.replace("\\", "/")))
    if target.startswith(("/", "\\")) or resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} is a link to {target!r}, outside the target folder; refusing to "
            "extract anything from this archive. Do not use it: download it again from the original source"
        )


def _extract_zip(archive: Path, staging: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _check_name(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    target = zf.read(info).decode("utf-8", "replace")
                    _check_link(archive, info.filename, target, relative_to_member=True)
                    raise UnsafeArchiveError(
                        f"{archive}: member {info.filename!r} is a symbolic link (to {target!r}); d2lft does not "
                        "extract links from zip files. Extract the archive by hand if you trust it"
                    )
            _check_free_space(archive, staging, sum(info.file_size for info in members))
            zf.extractall(staging, members=[info for info in members if not _is_junk(info.filename)])
    except zipfile.BadZipFile as err:  # also raised for a member whose CRC does not match
        raise DownloadError(f"{archive} is damaged ({err}): delete it and download it again") from err


def _extract_tar(archive: Path, staging: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                _check_name(archive, member.name)
                if member.issym():
                    _check_link(archive, member.name, member.linkname, relative_to_member=True)
                elif member.islnk():
                    _check_link(archive, member.name, member.linkname, relative_to_member=False)
                elif not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"{archive}: member {member.name!r} is a device or pipe, which a dataset never needs"
                    )
            _check_free_space(archive, staging, sum(member.size for member in members))
            keep = [member for member in members if not _is_junk(member.name)]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12: a second, independent check
                tf.extractall(staging, members=keep, filter="data")
            else:  # pragma: no cover - older Pythons rely on the checks above
                tf.extractall(staging, members=keep)
    except _TAR_FILTER_ERROR as err:
        raise UnsafeArchiveError(f"{archive}: {err}; refusing to extract this archive") from err
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as err:
        raise DownloadError(f"{archive} is damaged ({err}): delete it and download it again") from err


def _check_free_space(archive: Path, folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DownloadError(
            f"extracting {archive} needs {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free in {folder}: "
            "free some space or set $D2LFT_DATA_DIR to a bigger disk"
        )
