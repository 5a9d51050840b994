"""The input pipeline, the data-folder checks, the synthetic set and the download."""
import hashlib
import http.server
import io
import os
import signal
import tarfile
import threading
import time

import numpy as np
import pytest

import preprocess
from conftest import expect_error, start_script
from qatcifar import cifar
from qatcifar.cifar import CIFAR10_MEAN, CIFAR10_STD, DatasetError


def first_batch(dataset):
    images, labels = next(dataset.create_tuple_iterator(num_epochs=1))
    return images.asnumpy(), labels.asnumpy()


def test_training_pipeline_shapes_and_types(synthetic_dir):
    dataset = cifar.create_dataset(synthetic_dir, training=True, batch_size=16, num_samples=40)
    assert dataset.get_dataset_size() == 2  # 40 // 16: the remainder is dropped when training
    images, labels = first_batch(dataset)
    assert images.shape == (16, 3, 32, 32) and images.dtype == np.float32
    assert labels.shape == (16,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < cifar.NUM_CLASSES


def test_eval_pipeline_is_normalized_and_in_file_order(synthetic_dir):
    dataset = cifar.create_dataset(synthetic_dir, training=False, batch_size=32, num_samples=70)
    assert dataset.get_dataset_size() == 3  # the last, partial batch is kept for evaluation
    images, labels = first_batch(dataset)
    raw = np.fromfile(os.path.join(synthetic_dir, "test_batch.bin"), np.uint8,
                      count=32 * cifar.RECORD_BYTES).reshape(32, -1)
    assert (labels == raw[:, 0]).all()
    pixels = raw[:, 1:].reshape(32, 3, 32, 32) / 255.0
    expected = (pixels - np.array(CIFAR10_MEAN)[:, None, None]) / np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_training_draws_different_samples_each_epoch(synthetic_dir):
    dataset = cifar.create_dataset(synthetic_dir, training=True, batch_size=32, num_samples=32)
    iterator = dataset.create_tuple_iterator(num_epochs=2)  # one iterator over all epochs, as Model.train
    epochs = [[labels.asnumpy() for _, labels in iterator] for _ in range(2)]
    assert len(epochs[1]) == 1 and not np.array_equal(epochs[0][0], epochs[1][0])


def test_synthetic_refuses_to_overwrite(synthetic_dir):
    with pytest.raises(DatasetError, match="is not empty: it holds data_batch_1.bin and more"):
        cifar.write_synthetic(synthetic_dir)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*preprocess.py --download"):
        cifar.check_data_dir(str(tmp_path / "nope"), training=True)


def test_parent_of_the_data_folder_gets_a_hint(tmp_path):
    (tmp_path / cifar.ARCHIVE_FOLDER).mkdir()
    with pytest.raises(DatasetError, match=f"did you mean -data .*{cifar.ARCHIVE_FOLDER}"):
        cifar.check_data_dir(str(tmp_path), training=True)


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"no data_batch_\*.bin"):
        cifar.check_data_dir(str(tmp_path), training=True)
    with pytest.raises(DatasetError, match="no test_batch.bin"):
        cifar.check_data_dir(str(tmp_path), training=False)


def test_truncated_file_says_its_size(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(cifar.RECORD_BYTES * 300))
    with pytest.raises(DatasetError, match=r"921900 bytes \(300.00 records of 3073 bytes\)"):
        cifar.check_data_dir(str(tmp_path), training=True)


def test_bad_label_is_named(tmp_path):
    records = np.zeros((cifar.RECORDS_PER_FILE, cifar.RECORD_BYTES), np.uint8)
    records[17, 0] = 12
    records.tofile(tmp_path / "test_batch.bin")
    with pytest.raises(DatasetError, match="record 17 has label 12"):
        cifar.check_data_dir(str(tmp_path), training=False)


def test_class_names_from_meta_file(synthetic_dir, tmp_path, capsys):
    assert cifar.class_names(synthetic_dir)[3] == "synthetic_3"
    assert cifar.class_names(str(tmp_path)) == [str(i) for i in range(10)]
    (tmp_path / cifar.META_FILE).write_text("cat\ndog\n")
    assert cifar.class_names(str(tmp_path)) == [str(i) for i in range(10)]
    assert "names 2 classes, not 10; classes are numbered instead" in capsys.readouterr().err


@pytest.mark.parametrize("content, why", [(b"\xff\xfe\x00binary" * 3, "it is not UTF-8 text"),
                                          (b"x" * 5000, "it is over 4096 bytes")])
def test_unreadable_class_names_are_an_error(content, why, tmp_path):
    (tmp_path / cifar.META_FILE).write_bytes(content)
    with pytest.raises(DatasetError, match=f"cannot read the class names in .*batches.meta.txt \\({why}\\)"):
        cifar.class_names(str(tmp_path))


def test_class_names_from_a_fifo_are_refused_not_waited_for(tmp_path):
    os.mkfifo(tmp_path / cifar.META_FILE)
    with pytest.raises(DatasetError, match="batches.meta.txt is not a file"):
        cifar.class_names(str(tmp_path))


def full_file(path, label=0):
    records = np.zeros((cifar.RECORDS_PER_FILE, cifar.RECORD_BYTES), np.uint8)
    records[:, 0] = label
    records.tofile(path)


@pytest.mark.parametrize("name, training", [("old_test_batch.bin", False), ("test_batch_old.bin", False),
                                            (".test_batch.bin", False), ("backup_data_batch_1.bin", True),
                                            ("data_batch_1_copy.bin", True)])
def test_a_stray_file_that_cifar10dataset_would_read_is_named(name, training, tmp_path):
    """MindSpore's Cifar10Dataset reads every *.bin holding data_batch or test_batch: a stray full-size copy would
    double the split without a word, a short one fail in the pipeline."""
    full_file(tmp_path / ("data_batch_1.bin" if training else "test_batch.bin"))
    full_file(tmp_path / name)
    with pytest.raises(DatasetError, match=f"{name} is not a CIFAR-10 file name, but MindSpore's Cifar10Dataset "
                                           f"would read it .*move it out of"):
        cifar.check_data_dir(str(tmp_path), training)
    os.remove(tmp_path / name)
    cifar.check_data_dir(str(tmp_path), training)


def test_links_and_folders_among_the_data_files_are_named(tmp_path):
    os.symlink(tmp_path / "gone.bin", tmp_path / "test_batch.bin")
    with pytest.raises(DatasetError, match="cannot read .*test_batch.bin \\(No such file or directory\\)"):
        cifar.check_data_dir(str(tmp_path), training=False)
    os.remove(tmp_path / "test_batch.bin")
    os.symlink("test_batch.bin", tmp_path / "test_batch.bin")  # a loop
    with pytest.raises(DatasetError, match="cannot read .*test_batch.bin \\(Too many levels of symbolic links\\)"):
        cifar.check_data_dir(str(tmp_path), training=False)
    os.remove(tmp_path / "test_batch.bin")
    os.mkdir(tmp_path / "test_batch.bin")
    with pytest.raises(DatasetError, match="test_batch.bin is not a file; move it out"):
        cifar.check_data_dir(str(tmp_path), training=False)
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(DatasetError, match="data folder .*loop is a broken symbolic link \\(or a loop\\)"):
        cifar.check_data_dir(str(tmp_path / "loop"), training=False)


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


# --- download, against a server on 127.0.0.1 that serves an archive built here --------------

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
    """serve(payload) -> URL of that payload on a loopback HTTP server, shut down after the test."""
    servers = []

    def start(payload, claimed_length=None):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/cifar.tar.gz":
                    self.send_error(404)
                    return
                self.send_response(200)
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


def test_download_stops_an_endless_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "MAX_DOWNLOAD_BYTES", 8 << 20)  # (615 MB in use: as stopped, only later)
    with pytest.raises(DatasetError, match="file:///dev/zero sends more than 8388608 bytes"):
        cifar.download(str(tmp_path / "cifar"), "file:///dev/zero")
    assert os.listdir(tmp_path) == []


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
