"""README.md's Quick start, end to end: every command as written, in order, in a fresh copy of the project
(tests/readme.py, which also runs the Fewer bits section when asked: too long for the suite)."""
import pytest

from conftest import run_script


@pytest.mark.slow
def test_the_quick_start_runs_as_written():
    result = run_script("tests/readme.py", "--section", "Quick start", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(ran) == 11 and any("python predict.py" in line for line in ran)  # none left out but pip and pytest
    assert "all commands of Quick start ran" in result.stdout
