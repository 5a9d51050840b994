"""qatcifar.files: what a killed write leaves is removed by the next write into that folder."""
import os
import subprocess

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
