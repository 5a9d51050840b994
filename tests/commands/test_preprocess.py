"""preprocess.py end to end: --synthetic, and --download against a local HTTP server (a wrong checksum, a dropped
connection, hostile archives, endless streams, Ctrl-C)."""
import contextlib
import hashlib
import http.server
import io
import os
import re
import signal
import tarfile
import threading
import time

import pytest

import preprocess
from conftest import expect_error, start_script
from qatcifar import cifar
from qatcifar.cifar import DatasetError


def test_synthetic_refuses_to_overwrite(synthetic_dir):
    with pytest.raises(DatasetError, match="is not empty: it holds data_batch_1.bin and more"):
        cifar.write_synthetic(synthetic_dir)


def test_synthetic_refuses_a_folder_that_holds_anything(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    expect_error(preprocess.main, ["--synthetic", str(tmp_path)], capsys, "is not empty: it holds notes.txt",
                 "choose an empty or new folder")
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    expect_error(preprocess.main, ["--synthetic", str(tmp_path / "notes.txt")], capsys, "exists and is not a folder")
    expect_error(preprocess.main, ["--synthetic", str(tmp_path / "notes.txt" / "data" / "x")], capsys,
                 f"{tmp_path / 'notes.txt'} is not a folder")


@pytest.mark.parametrize("flags, fragment", [
    (["--url", "/data/cifar-10-binary.tar.gz"], "argument --url: takes an http://, https:// or file:// URL"),
    (["--url", "ftp://example.org/c.tar.gz"], "argument --url: takes an http://, https:// or file:// URL"),
    (["--md5", "abc"], "argument --md5: takes an MD5 digest (32 hexadecimal digits)"),
    (["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got -1"),
    (["--seed", "4294967296"], "argument --seed: must be an integer from 0 to 4294967295"),
])
def test_preprocess_flags_are_checked(flags, fragment, tmp_path, capsys):
    action = ["--synthetic", str(tmp_path / "s")] if flags[0] == "--seed" else ["--download", "-data", str(tmp_path)]
    expect_error(preprocess.main, action + flags, capsys, fragment)
    assert os.listdir(tmp_path) == []


def cifar_archive(members=("data_batch_1.bin", "test_batch.bin"), folder=cifar.ARCHIVE_FOLDER,
                  size=cifar.FILE_BYTES):
    """A .tar.gz laid out like the official one (zero images, label 0: small once compressed); members of `size`
    bytes."""
    buffer = io.BytesIO()
    content = bytes(size)
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in members:
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive():
    return cifar_archive()


@pytest.fixture
def serve():
    """serve(payload) -> URL of that payload on a loopback HTTP server, shut down after the test; serve(None): an
    endless stream of zeros, of no stated length."""
    servers = []

    def start(payload, claimed_length=None):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/cifar.tar.gz":
                    self.send_error(404)
                    return
                self.send_response(200)
                if payload is None:
                    self.end_headers()
                    with contextlib.suppress(OSError):  # (until the client hangs up)
                        while True:
                            self.wfile.write(bytes(1 << 20))
                    return
                self.send_header("Content-Length", str(claimed_length or len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/cifar.tar.gz"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_verifies_and_extracts(tmp_path, serve, archive, capsys):
    target = str(tmp_path / "cifar")
    url = serve(archive)
    preprocess.main(["--download", "-data", target, "--url", url, "--md5", hashlib.md5(archive).hexdigest()])
    assert sorted(os.listdir(target)) == ["data_batch_1.bin", "test_batch.bin"]
    assert os.listdir(tmp_path) == ["cifar"]  # no archive or temporary folder left behind
    assert "downloading" in capsys.readouterr().err
    cifar.check_data_dir(target, training=True)


def test_download_rejects_wrong_checksum_and_leaves_nothing(tmp_path, serve, archive, capsys):
    target = str(tmp_path / "cifar")
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(["--download", "-data", target, "--url", serve(archive)])  # the official MD5
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: checksum mismatch") and cifar.CIFAR10_MD5 in error
    assert os.listdir(tmp_path) == []


def test_download_refuses_members_outside_the_target(tmp_path, serve):
    evil = cifar_archive(members=("../../escaped.bin",), folder="")
    with pytest.raises(DatasetError, match="cannot extract"):
        cifar.download(str(tmp_path / "sub" / "cifar"), serve(evil), hashlib.md5(evil).hexdigest())
    assert not (tmp_path / "escaped.bin").exists() and os.listdir(tmp_path / "sub") == []


def test_download_reports_http_errors(tmp_path, serve, archive):
    url = serve(archive).replace("cifar.tar.gz", "missing.tar.gz")
    with pytest.raises(DatasetError, match="download of .* failed.*--url"):
        cifar.download(str(tmp_path / "cifar"), url)
    assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_nothing(tmp_path, serve, archive):
    url = serve(archive[: len(archive) // 2], claimed_length=len(archive))  # the connection drops halfway
    with pytest.raises(DatasetError, match="download of .*(failed|stopped after)"):
        cifar.download(str(tmp_path / "cifar"), url, hashlib.md5(archive).hexdigest())
    assert os.listdir(tmp_path) == []


def test_download_refuses_a_synthetic_folder(synthetic_dir, capsys):
    before = os.listdir(synthetic_dir)
    expect_error(preprocess.main, ["--download", "-data", synthetic_dir], capsys,
                 "holds synthetic data (SYNTHETIC.txt), not CIFAR-10; give another -data folder")
    assert os.listdir(synthetic_dir) == before


def test_download_from_a_file_url(tmp_path, archive):
    (tmp_path / "c.tar.gz").write_bytes(archive)
    target = str(tmp_path / "cifar")
    cifar.download(target, (tmp_path / "c.tar.gz").as_uri(), hashlib.md5(archive).hexdigest())
    assert sorted(os.listdir(target)) == ["data_batch_1.bin", "test_batch.bin"]


def linked_archive(kind):
    """The CIFAR-10 folder as a link to a sibling folder (kind "symlink"), or a data file hard-linked to another."""
    buffer = io.BytesIO()
    content = bytes(cifar.FILE_BYTES)
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("real/data_batch_1.bin", "real/test_batch.bin"):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        link = tarfile.TarInfo(cifar.ARCHIVE_FOLDER if kind == "symlink" else
                               f"{cifar.ARCHIVE_FOLDER}/test_batch.bin")
        link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        link.linkname = "real" if kind == "symlink" else "real/test_batch.bin"
        tar.addfile(link)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_download_refuses_links_in_the_archive(kind, tmp_path, serve, capsys):
    payload = linked_archive(kind)
    target = tmp_path / "cifar"
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(["--download", "-data", str(target), "--url", serve(payload),
                         "--md5", hashlib.md5(payload).hexdigest()])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert error.startswith("error: the archive's member") and "is a link: this is not the CIFAR-10" in error
    assert os.listdir(tmp_path) == []


def test_download_refuses_an_oversized_member_before_extracting_it(tmp_path, serve):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{cifar.ARCHIVE_FOLDER}/data_batch_1.bin")
        info.size = cifar.FILE_BYTES + 1
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    payload = buffer.getvalue()
    with pytest.raises(DatasetError, match=f"is {cifar.FILE_BYTES + 1} bytes, larger than a CIFAR-10 file"):
        cifar.download(str(tmp_path / "cifar"), serve(payload), hashlib.md5(payload).hexdigest())
    assert os.listdir(tmp_path) == []


def test_download_refuses_an_archive_of_many_members(tmp_path, serve):
    """A bomb of many small members (each within the size limit) is stopped after the 20th."""
    payload = cifar_archive(members=[f"x{i}.txt" for i in range(25)], size=10)
    with pytest.raises(DatasetError, match="x20.txt is number 21, more than the 20 allowed"):
        cifar.download(str(tmp_path / "cifar"), serve(payload), hashlib.md5(payload).hexdigest())
    assert os.listdir(tmp_path) == []


def test_download_stops_an_endless_stream(tmp_path, serve, monkeypatch):
    monkeypatch.setattr(cifar, "MAX_DOWNLOAD_BYTES", 8 << 20)  # (615 MB in use: as stopped, only later)
    url = serve(None)
    with pytest.raises(DatasetError, match=f"{url} sends more than 8388608 bytes"):
        cifar.download(str(tmp_path / "cifar"), url)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "missing"])
def test_a_file_url_must_name_a_regular_file(kind, tmp_path):
    """A FIFO would block the download forever; /dev/zero would stream without end; a folder or a missing file has
    nothing to read."""
    path = {"device": "/dev/zero"}.get(kind, str(tmp_path / "archive"))
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        os.mkdir(path)
    what = {"fifo": "a FIFO", "device": "a device", "folder": "a folder", "missing": "missing"}[kind]
    url = "file://" + path
    with pytest.raises(DatasetError, match=f"^{re.escape(url)}: {re.escape(path)} is {what}, not the archive's file"):
        cifar.download(str(tmp_path / "cifar"), url)
    assert not (tmp_path / "cifar").exists()


def test_download_refuses_a_broken_symbolic_link_as_the_target(tmp_path, capsys):
    os.symlink(tmp_path / "elsewhere", tmp_path / "cifar")
    expect_error(preprocess.main, ["--download", "-data", str(tmp_path / "cifar")], capsys,
                 "is a broken symbolic link; remove it")


@pytest.mark.slow
def test_ctrl_c_during_a_download_ends_with_one_line_and_leaves_nothing(tmp_path):
    """The server sends the headers, then nothing: Ctrl-C breaks off the waiting read at once (not after the
    60 s timeout) and the temporary folder goes."""
    asked, release = threading.Event(), threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.flush()
            asked.set()
            release.wait(120)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stalling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        process = start_script("preprocess.py", "--download", "-data", str(tmp_path / "cifar"), "--url",
                               f"http://127.0.0.1:{server.server_address[1]}/c.tar.gz")
        assert asked.wait(60)
        time.sleep(0.5)  # the client is now waiting in its read
        started = time.time()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert time.time() - started < 10
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert process.returncode == 130
    assert stderr.splitlines() == ["interrupted: no data was completed"]
    assert os.listdir(tmp_path) == []
