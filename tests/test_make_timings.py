"""bench/make_timings.py: a Makefile target timed as a user runs it, appended to its results file."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "make_timings.py"


def run(tmp_path, *targets):
    return subprocess.run([sys.executable, str(SCRIPT), *targets, "--directory", str(tmp_path),
                           "--results", str(tmp_path / "timings.json")], capture_output=True, text=True)


def test_a_target_is_timed_and_a_second_one_is_appended(tmp_path):
    (tmp_path / "Makefile").write_text("slow:\n\tsleep 1.2\nserve-env:\n\tmkdir -p .venv-serve && head -c 30000000 /dev/zero > .venv-serve/blob\n")
    assert run(tmp_path, "slow").returncode == 0
    assert run(tmp_path, "serve-env").returncode == 0
    results = json.loads((tmp_path / "timings.json").read_text())
    assert 1.2 <= results["slow"]["wall_s"] < 10 and results["slow"]["seconds"] >= 1
    assert results["serve-env"]["from_nothing"] and results["serve-env"]["disk_gb"] == 0.03  # what it left
    assert results["slow"]["machine"]["git_commit"] and results["slow"]["command"] == "python bench/make_timings.py slow"


def test_a_failing_target_records_nothing(tmp_path):
    (tmp_path / "Makefile").write_text("broken:\n\tfalse\n")
    done = run(tmp_path, "broken")
    assert done.returncode != 0 and "make broken failed" in done.stderr
    assert not (tmp_path / "timings.json").exists()
