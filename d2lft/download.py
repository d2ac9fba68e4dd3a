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
_MAX_NAME = 255  # bytes in one file name (ext4, APFS, NTFS)
_MAX_PATH = 4095  # bytes in a whole path (Linux PATH_MAX minus the final NUL)


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
    :class:`UnsafeArchiveError` naming the member, as do links of any kind (a dataset needs none), devices
    and names too long for the file system. Tar members are written by d2lft itself (no ``tarfile``
    extraction filter, whose link check some Python versions lack or can be bypassed: CVE-2025-4517). macOS junk (``__MACOSX/``, ``.DS_Store``) is
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
                _check_length(archive, info.filename, staging)
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
    # No tarfile.extract/extractall: its "data" filter resolves links with os.path.realpath, which gives
    # up on paths over PATH_MAX (CVE-2025-4517, Python < 3.11.13 / 3.12.11; 3.10.0-3.10.11 have no
    # filter at all). A dataset needs no links, so none are extracted, and every file is written here.
    try:
        with tarfile.open(archive) as tf:
            try:
                members = tf.getmembers()
            except OSError as err:  # a header whose size sends the reader past what a file can hold
                raise DownloadError(f"{archive} is damaged ({err}): delete it and download it again") from err
            for member in members:
                _check_name(archive, member.name)
                _check_length(archive, member.name, staging)
                if member.issym() or member.islnk():
                    _check_link(archive, member.name, member.linkname, relative_to_member=member.issym())
                    kind = "symbolic" if member.issym() else "hard"
                    raise UnsafeArchiveError(
                        f"{archive}: member {_short(member.name)!r} is a {kind} link (to {_short(member.linkname)!r}); "
                        "d2lft does not extract links from tar files. Extract the archive by hand if you trust it"
                    )
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"{archive}: member {member.name!r} is a device or pipe, which a dataset never needs"
                    )
            _check_free_space(archive, staging, sum(member.size for member in members))
            for member in members:
                if not _is_junk(member.name):
                    _write_tar_member(archive, tf, member, staging)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as err:
        raise DownloadError(f"{archive} is damaged ({err}): delete it and download it again") from err


def _check_length(archive: Path, name: str, staging: Path) -> None:
    """Refuse names the file system cannot hold (so a long name fails before anything is written)."""
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    longest = max((len(os.fsencode(part)) for part in parts), default=0)
    total = len(os.fsencode(str(staging))) + sum(len(os.fsencode(part)) + 1 for part in parts)
    if longest > _MAX_NAME or total > _MAX_PATH:
        raise UnsafeArchiveError(
            f"{archive}: member {_short(name)!r} has a name of {len(name):,} characters, too long to extract "
            f"(at most {_MAX_NAME} bytes per name and {_MAX_PATH:,} per path here); refusing to extract this "
            "archive. Do not use it: download it again from the original source"
        )


def _short(name: str, limit: int = 80) -> str:
    """A member name short enough for a one-line message."""
    return name if len(name) <= limit else f"{name[:limit - 3]}..."


def _write_tar_member(archive: Path, tf: tarfile.TarFile, member: tarfile.TarInfo, staging: Path) -> None:
    """Create a folder or write a regular file under ``staging``, following no link on the way."""
    parts = [part for part in member.name.split("/") if part not in ("", ".")]
    if not parts:
        return
    root = os.path.realpath(staging)
    target = os.path.join(root, *parts)
    folder = target if member.isdir() else os.path.dirname(target)
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
        # Belt and braces: nothing above creates links, but check the resolved path before writing.
        if os.path.commonpath([root, os.path.realpath(folder)]) != root:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} would be written outside {staging}")
        if member.isdir():
            return
        source = tf.extractfile(member)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_BINARY", 0)
        with source, open(os.open(target, flags, 0o644), "wb") as file:
            shutil.copyfileobj(source, file, _CHUNK)
    except UnsafeArchiveError:
        raise
    except OSError as err:  # e.g. a file and a folder of the same name: the archive is not a dataset
        raise DownloadError(
            f"{archive}: cannot extract member {member.name!r} ({err.strerror or err}): delete the archive and "
            "download it again"
        ) from err


def _check_free_space(archive: Path, folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DownloadError(
            f"extracting {archive} needs {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free in {folder}: "
            "free some space or set $D2LFT_DATA_DIR to a bigger disk"
        )
