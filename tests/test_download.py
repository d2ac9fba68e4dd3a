"""Tests for d2lft.download against a real local HTTP server, and zip-slip archives built on the fly."""
from __future__ import annotations

import hashlib
import io
import socket
import stat
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import realpath_limit_tar

from d2lft.download import DownloadError, UnsafeArchiveError, download_url, extract_archive, sha1sum


def _zip_bytes(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", compression) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return data.getvalue()


DATASET = {
    "shapes/train/circle/0.txt": b"circle 0",
    "shapes/train/square/0.txt": b"square 0",
    "shapes/val/circle/0.txt": b"circle 1",
    "__MACOSX/shapes/._0.txt": b"apple double",
    "shapes/.DS_Store": b"finder",
}
ZIP = _zip_bytes(DATASET)
ZIP_SHA1 = hashlib.sha1(ZIP).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Routes: /data.zip (whole), /flaky.zip (first answer cut short), /slow.zip, /missing.zip (404)."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        server = self.server
        server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path == "/missing.zip":
            self.send_error(404, "Not Found")
            return
        if self.path == "/slow.zip":
            time.sleep(1.0)
        cut = self.path == "/cut.zip" or (self.path == "/flaky.zip" and server.hits.count(self.path) == 1)
        body = ZIP[: len(ZIP) // 2] if cut else ZIP
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(ZIP)))  # the full length, even when we send less
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first (the timeout test)
            return
        if cut:  # the connection dies mid-stream
            self.close_connection = True

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server():
    """A real HTTP server on 127.0.0.1 (a free port), recording the paths it was asked for in ``.hits``."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("D2LFT_OFFLINE", raising=False)


# ---------------------------------------------------------------- download_url


def test_download_verify_and_extract(server, tmp_path):
    dest = download_url(f"{server.url}/data.zip", tmp_path / "data" / "shapes.zip", sha1=ZIP_SHA1.upper())
    assert dest == tmp_path / "data" / "shapes.zip"
    assert dest.read_bytes() == ZIP and sha1sum(dest) == ZIP_SHA1
    assert not (tmp_path / "data" / "shapes.zip.part").exists()

    folder = extract_archive(dest, tmp_path / "data")
    assert folder == tmp_path / "data" / "shapes"
    assert (folder / "train" / "circle" / "0.txt").read_bytes() == b"circle 0"
    assert (folder / "val" / "circle" / "0.txt").read_bytes() == b"circle 1"
    assert not (tmp_path / "data" / "__MACOSX").exists() and not (folder / ".DS_Store").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["shapes", "shapes.zip"]  # no temp left


def test_existing_verified_file_is_reused_without_network(server, tmp_path):
    dest = download_url(f"{server.url}/data.zip", tmp_path / "d.zip", sha1=ZIP_SHA1)
    assert download_url(f"{server.url}/data.zip", dest, sha1=ZIP_SHA1) == dest
    assert download_url(f"{server.url}/data.zip", dest) == dest  # no hash given: a complete file is reused
    assert server.hits == ["/data.zip"]


def test_existing_file_with_wrong_hash_is_downloaded_again(server, tmp_path):
    dest = tmp_path / "d.zip"
    dest.write_bytes(b"an older, different file")
    download_url(f"{server.url}/data.zip", dest, sha1=ZIP_SHA1)
    assert dest.read_bytes() == ZIP and server.hits == ["/data.zip"]


def test_stale_part_file_is_never_taken_as_complete(server, tmp_path):
    dest = tmp_path / "d.zip"
    (tmp_path / "d.zip.part").write_bytes(ZIP[:100] + b"garbage from an interrupted run")
    download_url(f"{server.url}/data.zip", dest)
    assert dest.read_bytes() == ZIP and not (tmp_path / "d.zip.part").exists()


def test_checksum_mismatch_deletes_the_file_and_names_both_hashes(server, tmp_path):
    wrong = "0" * 40
    dest = tmp_path / "d.zip"
    with pytest.raises(DownloadError) as info:
        download_url(f"{server.url}/data.zip", dest, sha1=wrong)
    message = str(info.value)
    assert f"{server.url}/data.zip" in message and str(dest) in message
    assert wrong in message and ZIP_SHA1 in message
    assert list(tmp_path.iterdir()) == []  # neither dest nor dest.part


def test_interrupted_download_leaves_nothing_and_the_next_call_succeeds(server, tmp_path):
    dest = tmp_path / "d.zip"
    with pytest.raises(DownloadError, match=f"stopped after {len(ZIP) // 2:,} of {len(ZIP):,} bytes"):
        download_url(f"{server.url}/flaky.zip", dest)  # no sha1: the length check alone must catch it
    assert list(tmp_path.iterdir()) == []
    assert download_url(f"{server.url}/flaky.zip", dest, sha1=ZIP_SHA1).read_bytes() == ZIP
    assert server.hits == ["/flaky.zip", "/flaky.zip"]


def test_http_error_names_the_status_and_what_to_do(server, tmp_path, monkeypatch):
    monkeypatch.setenv("D2LFT_DATA_DIR", str(tmp_path / "my-data"))
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_url(f"{server.url}/missing.zip", tmp_path / "d.zip")
    message = str(info.value)
    # one sentence of advice, naming the file actually asked for; not a data folder it was not asked about
    assert f"by hand (a browser works) and save it as {tmp_path / 'd.zip'}" in message
    assert "my-data" not in message and message.count("by hand") == 1 and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_refused_connection_gives_a_helpful_error(tmp_path):
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        download_url(f"http://127.0.0.1:{port}/data.zip", tmp_path / "d.zip", timeout=5)
    message = str(info.value)
    assert "could not download" in message and "refused" in message.lower()
    assert "by hand" in message and str(tmp_path / "d.zip") in message and message.count("by hand") == 1
    assert list(tmp_path.iterdir()) == []


def test_timeout(server, tmp_path):
    with pytest.raises(DownloadError, match="timed out"):
        download_url(f"{server.url}/slow.zip", tmp_path / "d.zip", timeout=0.2)
    assert list(tmp_path.iterdir()) == []


def test_offline_env_var_means_no_network_attempt(server, tmp_path, monkeypatch):
    monkeypatch.setenv("D2LFT_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline") as info:
        download_url(f"{server.url}/data.zip", tmp_path / "d.zip")
    assert "by hand" in str(info.value)
    assert server.hits == [] and list(tmp_path.iterdir()) == []
    # ... but a verified file that is already there is still usable offline
    (tmp_path / "d.zip").write_bytes(ZIP)
    assert download_url(f"{server.url}/data.zip", tmp_path / "d.zip", sha1=ZIP_SHA1).read_bytes() == ZIP
    assert server.hits == []


def test_offline_argument_overrides_the_environment(server, tmp_path):
    with pytest.raises(DownloadError, match="offline"):
        download_url(f"{server.url}/data.zip", tmp_path / "d.zip", offline=True)
    assert server.hits == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sha1": "abc"}, "sha1='abc'"), ({"sha1": "z" * 40}, "40 hex"), ({"timeout": 0}, "timeout=0")],
)
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        download_url("https://example.org/x.zip", tmp_path / "x.zip", **kwargs)


def test_unsupported_url_scheme(tmp_path):
    with pytest.raises(ValueError, match="url='javascript:x'"):
        download_url("javascript:x", tmp_path / "x.zip")


def test_sha1sum_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_001)
    assert sha1sum(path, chunk_size=4096) == hashlib.sha1(b"x" * 3_000_001).hexdigest()


# ---------------------------------------------------------------- extract_archive


def _evil_zip(path: Path, name: str, content: bytes = b"evil", *, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data/fine.txt", b"fine")  # a harmless member first: it must not be written either
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, content)
    return path


def _assert_nothing_written(tmp_path: Path, dest: Path) -> None:
    assert list(dest.iterdir()) == []  # not even the harmless member, not even a temp folder
    assert not list(tmp_path.rglob("evil*"))
    assert not (tmp_path / "outside").exists()


def test_zip_member_with_dot_dot_is_refused(tmp_path):
    archive = _evil_zip(tmp_path / "a.zip", "data/../../evil.txt")
    with pytest.raises(UnsafeArchiveError, match=r"'data/\.\./\.\./evil\.txt'"):
        extract_archive(archive, tmp_path / "dest" / "inner")
    _assert_nothing_written(tmp_path, tmp_path / "dest" / "inner")


def test_zip_member_with_absolute_path_is_refused(tmp_path):
    target = tmp_path / "outside" / "evil.txt"
    archive = _evil_zip(tmp_path / "a.zip", str(target))
    with pytest.raises(UnsafeArchiveError, match="absolute path"):
        extract_archive(archive, tmp_path / "dest")
    _assert_nothing_written(tmp_path, tmp_path / "dest")


def test_zip_member_with_windows_separators_is_refused(tmp_path):
    archive = _evil_zip(tmp_path / "a.zip", "data\\..\\..\\evil.txt")
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "dest")
    _assert_nothing_written(tmp_path, tmp_path / "dest")


@pytest.mark.parametrize("target", ["../../outside", "/etc", "sub/../../.."])
def test_zip_symlink_pointing_outside_is_refused(tmp_path, target):
    archive = _evil_zip(tmp_path / "a.zip", "data/link", target.encode(), symlink=True)
    with pytest.raises(UnsafeArchiveError, match="'data/link' is a link to"):
        extract_archive(archive, tmp_path / "dest")
    _assert_nothing_written(tmp_path, tmp_path / "dest")


def test_zip_symlinks_are_not_extracted_even_inside(tmp_path):
    archive = _evil_zip(tmp_path / "a.zip", "data/link", b"fine.txt", symlink=True)
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract_archive(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def _tar(path: Path, members: list[tarfile.TarInfo], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info in members:
            data = b"evil" if info.isfile() else None
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_tar_gz_is_extracted(tmp_path):
    archive = _tar(tmp_path / "d.tar.gz", [_member("set/train/a/0.txt"), _member("set/val/a/0.txt")])
    folder = extract_archive(archive, tmp_path / "data")
    assert folder == tmp_path / "data" / "set" and (folder / "val" / "a" / "0.txt").read_bytes() == b"evil"


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([_member("ok.txt"), _member("../evil.txt")], "'../evil.txt'"),
        ([_member("ok.txt"), _member("/tmp/evil-d2lft-test.txt")], "absolute path"),
        ([_member("link", tarfile.SYMTYPE, "../../outside"), _member("link/evil.txt")], "'link' is a link"),
        ([_member("link", tarfile.SYMTYPE, "/etc")], "'link' is a link to '/etc'"),
        ([_member("hard", tarfile.LNKTYPE, "../outside/evil.txt")], "'hard'"),
        ([_member("fifo", tarfile.FIFOTYPE)], "device or pipe"),
    ],
    ids=["dot-dot", "absolute", "symlink-out", "symlink-absolute", "hardlink-out", "fifo"],
)
def test_unsafe_tar_members_are_refused(tmp_path, members, match):
    archive = _tar(tmp_path / "a.tar.gz", members)
    with pytest.raises(UnsafeArchiveError, match=match):
        extract_archive(archive, tmp_path / "dest")
    _assert_nothing_written(tmp_path, tmp_path / "dest")
    assert not Path("/tmp/evil-d2lft-test.txt").exists()


def test_tar_symlink_chain_escaping_is_refused(tmp_path):
    # each link looks harmless on its own ("a" -> ".", "a/b" -> ".."), together they climb out of dest;
    # Python's "data" filter (resolving links already extracted) catches what a name check cannot
    members = [_member("a", tarfile.SYMTYPE, "."), _member("a/b", tarfile.SYMTYPE, ".."), _member("a/b/evil.txt")]
    archive = _tar(tmp_path / "chain.tar", members, mode="w")
    with pytest.raises(UnsafeArchiveError):
        extract_archive(archive, tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists() and not list(tmp_path.rglob("evil.txt"))


def test_a_crash_mid_extraction_leaves_no_half_extracted_folder(tmp_path):
    data = bytearray(_zip_bytes({"set/a.txt": b"a" * 1000, "set/b.txt": b"b" * 1000}, zipfile.ZIP_STORED))
    data[data.index(b"set/b.txt") + 100] ^= 0xFF  # damage b's stored bytes: CRC error after a is written
    archive = tmp_path / "damaged.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="damaged"):
        extract_archive(archive, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []  # no "set/" that would later pass for complete


def test_not_an_archive(tmp_path):
    (tmp_path / "x.zip").write_text("<html>Service unavailable</html>")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        extract_archive(tmp_path / "x.zip", tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_existing_folder_is_not_overwritten_unless_asked(tmp_path):
    archive = tmp_path / "d.zip"
    archive.write_bytes(ZIP)
    (tmp_path / "data" / "shapes").mkdir(parents=True)
    (tmp_path / "data" / "shapes" / "mine.txt").write_text("keep me")
    with pytest.raises(DownloadError, match="already exists"):
        extract_archive(archive, tmp_path / "data")
    assert (tmp_path / "data" / "shapes" / "mine.txt").exists()
    folder = extract_archive(archive, tmp_path / "data", overwrite=True)
    assert not (folder / "mine.txt").exists() and (folder / "train" / "circle" / "0.txt").exists()


def test_archive_with_several_top_level_entries_returns_dest(tmp_path):
    archive = tmp_path / "flat.zip"
    archive.write_bytes(_zip_bytes({"a.txt": b"a", "b/c.txt": b"c"}))
    assert extract_archive(archive, tmp_path / "data") == tmp_path / "data"
    assert (tmp_path / "data" / "b" / "c.txt").read_bytes() == b"c"


# Issue 11, defect 1: no tar member may write outside the extraction folder, whatever the Python version.


def test_tar_links_are_not_extracted_even_inside(tmp_path):
    for kind, member in [("symbolic", _member("set/link", tarfile.SYMTYPE, "0.txt")),
                         ("hard", _member("set/hard", tarfile.LNKTYPE, "set/0.txt"))]:
        archive = _tar(tmp_path / f"{kind}.tar", [_member("set/0.txt"), member], mode="w")
        with pytest.raises(UnsafeArchiveError, match=f"is a {kind} link .* does not extract links"):
            extract_archive(archive, tmp_path / "dest")
        assert list((tmp_path / "dest").iterdir()) == []


def test_tar_link_chain_through_symlinked_folders_is_refused(tmp_path):
    # "a" -> ".", so "a/a/a/up" -> "../.." looks one level deep by name but climbs out of dest
    members = [_member("a", tarfile.SYMTYPE, "."), _member("a/a/a/up", tarfile.SYMTYPE, "../.."),
               _member("a/a/a/up/evil.txt")]
    archive = _tar(tmp_path / "chain.tar", members, mode="w")
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_archive(archive, tmp_path / "dest" / "inner")
    assert not list(tmp_path.rglob("evil.txt"))


def test_tar_realpath_limit_bypass_cve_2025_4517_writes_nothing_outside(tmp_path):
    # Python 3.11.7's "data" filter lets this archive write escape/evil.txt two folders above the
    # extraction folder; d2lft must refuse it on every Python version.
    dest = tmp_path / "dest"
    archive = realpath_limit_tar(tmp_path / "x.tar", climb=2,
                                 extract_dir_length=len(str(dest)) + len("/.x.tar.extracting-") + 8)
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_archive(archive, dest)
    assert not list(tmp_path.rglob("evil.txt"))
    assert list(dest.iterdir()) == []


def test_tar_member_longer_than_path_max_is_refused_before_anything_is_written(tmp_path):
    deep = "/".join(["d" * 200] * 21) + "/0.txt"  # 4,226 characters
    archive = _tar(tmp_path / "long.tar", [_member("set/ok.txt"), _member(deep)], mode="w")
    with pytest.raises(UnsafeArchiveError, match=r"4,226 characters, too long to extract"):
        extract_archive(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []
    archive = _tar(tmp_path / "name.tar", [_member("set/" + "n" * 300 + ".txt")], mode="w")
    with pytest.raises(UnsafeArchiveError, match="too long"):
        extract_archive(archive, tmp_path / "dest")


def test_tar_file_and_folder_of_the_same_name_is_one_clear_error(tmp_path):
    archive = _tar(tmp_path / "clash.tar", [_member("set/x"), _member("set/x/0.txt")], mode="w")
    with pytest.raises(DownloadError, match="cannot extract member 'set/x/0.txt'"):
        extract_archive(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_tar_files_are_written_without_setuid_or_exec_bits(tmp_path):
    info = _member("set/run.sh")
    info.mode = 0o6777
    folder = extract_archive(_tar(tmp_path / "m.tar", [info], mode="w"), tmp_path / "dest")
    assert stat.S_IMODE((folder / "run.sh").stat().st_mode) & 0o7111 == 0
    assert (folder / "run.sh").read_bytes() == b"evil"


def test_tar_header_with_an_impossible_size_is_reported_as_damaged(tmp_path):
    archive = tmp_path / "huge.tar"
    info = tarfile.TarInfo("set/big")
    info.size = 10**15  # the reader seeks past the largest file offset: OSError (EINVAL) in tarfile
    archive.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + bytes(1024))
    with pytest.raises(DownloadError, match="damaged"):
        extract_archive(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_zip_member_longer_than_path_max_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "long.zip"
    archive.write_bytes(_zip_bytes({"set/ok.txt": b"ok", "/".join(["d" * 200] * 21) + "/0.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError, match="too long to extract"):  # was an OSError traceback
        extract_archive(archive, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []
