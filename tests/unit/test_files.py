"""qatcifar.files: what a killed write leaves is removed by the next write into that folder; small files are read
bounded."""
import os
import subprocess

import pytest

from qatcifar import files


def test_the_partial_folder_of_a_killed_write_is_removed_by_the_next_write_there(tmp_path):
    """What SIGKILL leaves (export.py's .partial-<pid>/ folder, plot.py's half-written PNG in one) goes at the next
    write into that folder, by any command; a living process's stays."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".partial-{dead.pid}"
    stale.mkdir()
    (stale / "curves.png").write_bytes(b"")
    living = tmp_path / f".partial-{os.getppid()}"
    living.mkdir()
    files.write_text(str(tmp_path / "args.json"), "{}")
    assert sorted(os.listdir(tmp_path)) == sorted(["args.json", living.name])


def test_small_files_are_read_bounded(tmp_path):
    """--layer_bits, args.json, metrics: regular files of bounded size only, never a blocking open() or a read of
    gigabytes; nesting beyond the parser's depth is a ValueError, not a RecursionError."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "big").write_bytes(b" " * 101)
    (tmp_path / "deep").write_text("[" * 100_000)
    (tmp_path / "ok").write_text('{"fc": 4}')
    for path, why in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                      (tmp_path, "not a regular file"), (tmp_path / "big", "larger than 100 bytes")):
        with pytest.raises(OSError) as error:
            files.read_small(str(path), limit=100)
        assert files.why(error.value) == why
    with pytest.raises(ValueError, match="nested too deeply"):
        files.load_json(str(tmp_path / "deep"))
    assert files.load_json(str(tmp_path / "ok")) == {"fc": 4}


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    """write_folder_atomically (export.py --format c): a write that fails leaves no folder and no partial one; an
    existing folder is replaced only with overwrite, and stays as it was when the new one fails."""
    target = tmp_path / "model_c"

    def write(files_):
        def into(folder):
            for name, text in files_.items():
                if text is None:
                    raise OSError(28, "No space left on device")
                (tmp_path / folder / name).write_text(text)
        return into

    with pytest.raises(OSError):
        files.write_folder_atomically(str(target), write({"model.h": "x", "model.c": None}))
    assert os.listdir(tmp_path) == []
    files.write_folder_atomically(str(target), write({"model.h": "old"}))
    with pytest.raises(FileExistsError):
        files.write_folder_atomically(str(target), write({"model.h": "new"}))
    with pytest.raises(OSError):
        files.write_folder_atomically(str(target), write({"model.h": "new", "model.c": None}), overwrite=True)
    assert os.listdir(target) == ["model.h"] and (target / "model.h").read_text() == "old"
    files.write_folder_atomically(str(target), write({"model.c": "new"}), overwrite=True)
    assert os.listdir(tmp_path) == ["model_c"] and os.listdir(target) == ["model.c"]
