"""bench/device_check.py's machinery: each step under its own limit, a failure or a cut-short step
recorded while the others still run, the summary on disk after every step, a scratch folder of
someone else's never deleted. The whole check runs in DRY mode in tests/e2e/test_device_check.py."""
import json
import time
from pathlib import Path

import pytest

from bench.device_check import DRY, GPU, Check, run_check, verdict
from bench.e2e_uptrain import JobFailed


@pytest.fixture
def check(tmp_path):
    return Check(DRY, tmp_path, tmp_path / "work", deadline=time.time() + 1000)


def on_disk(check) -> dict:
    return json.loads(check.summary_path.read_text())["steps"]


def test_a_failing_step_is_recorded_and_the_steps_after_it_still_run(check):
    assert check.step("machine", lambda limit: 1 / 0) is None
    assert on_disk(check)["machine"]["status"] == "failed"
    assert on_disk(check)["machine"]["error"].startswith("ZeroDivisionError")
    assert check.step("model", lambda limit: {"limit": limit}) == {"limit": DRY.limits["model"]}
    assert check.step("convert", lambda limit: 1, needs=("machine",)) is None
    assert on_disk(check)["convert"] == {"status": "skipped", "why": "needs machine"}
    assert on_disk(check)["model"]["status"] == "ok"


def test_steps_get_the_time_left_and_none_starts_without_enough(check):
    check.deadline = time.time() + 100
    assert 80 < check.step("model", lambda limit: limit) <= 100
    check.deadline = time.time() + 15
    assert check.step("zero3", lambda limit: limit) is None
    assert on_disk(check)["zero3"]["status"] == "skipped" and on_disk(check)["zero3"]["why"].endswith("s left")


def test_only_the_steps_asked_for_run(tmp_path):
    check = Check(DRY, tmp_path, tmp_path / "work", deadline=time.time() + 1000, only=("model",))
    assert check.step("machine", lambda limit: 1) is None and check.step("model", lambda limit: 2) == 2
    assert on_disk(check)["machine"]["why"] == "not asked for (STEPS)"


def test_a_step_past_its_limit_is_killed_with_every_process_it_started(check, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    tic = time.time()
    with pytest.raises(JobFailed, match="outlasted its 2 s"):
        check.command(["-c", code], limit=2)
    assert time.time() - tic < 30
    time.sleep(0.5)
    assert not alive(int(pid_file.read_text()))


def alive(pid: int) -> bool:
    """Running, not a zombie (a killed process whose new parent, where PID 1 is no init, never reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_scratch_folder_of_someone_elses_is_never_deleted(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    assert run_check(DRY, tmp_path / "out", work, time.time() + 100, {}) == 2
    assert (work / "notes.txt").read_text() == "mine"
    assert "holds files the check did not write" in capsys.readouterr().err


def test_the_verdict_holds_the_issues_targets():
    results = {"mfu": {"source": {"tokens_per_s": 100.0, "mfu": 0.46}, "fusedkv": {"tokens_per_s": 99.0, "mfu": 0.44}},
               "reload": {"relative_difference": 2e-4}, "kill_resume": {"same_loss": True}, "most_checkpoints_at_once": 1}
    assert verdict(results, GPU) == {"mfu_at_least_0.45": False, "every_layout_at_least_the_control": False,
                                     "zero3_export_reloads_to_the_logged_ppl": True, "kill_resume_same_loss": True,
                                     "at_most_one_checkpoint": True}
    assert verdict({"most_checkpoints_at_once": 2}, GPU) == {
        "mfu_at_least_0.45": None, "every_layout_at_least_the_control": None,
        "zero3_export_reloads_to_the_logged_ppl": None, "kill_resume_same_loss": None, "at_most_one_checkpoint": False}
