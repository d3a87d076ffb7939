"""bench/device_check.sh in DRY mode: the whole GPU check on the CPU at tiny shapes, each step in
processes of its own, the uptrain runs under the deepspeed launcher (one process, DeepSpeed's CPU
accelerator) as on the GPU. In make test-e2e, not make test: its sixteen processes each import
torch, transformers or DeepSpeed (about 80 CPU-seconds in all), and make test keeps under 6
minutes. tests/test_device_check.py checks the step machinery itself in make test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(2400)  # minutes on an idle CPU; a CPU shared with other jobs can take ten times longer
def test_the_dry_run_passes_every_step_and_writes_only_into_out(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DRY": "1", "OUT": str(out), "WORK": str(work), "PY": sys.executable, "DEADLINE": "3000",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "bench/device_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = json.loads((out / "device_check_cpu.json").read_text())
    assert proc.returncode == 0, json.dumps(summary["steps"], indent=1) + proc.stderr[-3000:]
    assert {name: step["status"] for name, step in summary["steps"].items()} == dict.fromkeys(
        ("machine", "mfu", "model", "convert", "zero3", "reload", "resume"), "ok")
    verdict = summary["verdict"]
    assert verdict["mfu_at_least_0.45"] is None  # no MFU on a CPU; tokens/s ratios on a shared CPU are not judged here
    assert verdict["zero3_export_reloads_to_the_logged_ppl"] and verdict["kill_resume_same_loss"]
    assert verdict["at_most_one_checkpoint"]
    assert [(c["run"], c["tag"]) for c in summary["checkpoints"]] == [("zero3", "step4"), ("resume", "step2"),
                                                                     ("resume", "step4")]
    assert all(c["bytes"] > 0 for c in summary["checkpoints"]) and summary["most_checkpoints_at_once"] == 1
    resume = summary["kill_resume"]
    assert resume["losses_resumed"] == resume["losses_straight"] and len(resume["losses_straight"]) == 4
    assert set(summary["mfu"]) == {"source", "fusedkv"} and all(r["tokens_per_s"] > 0 for r in summary["mfu"].values())
    assert summary["machine"]["torch"] and summary["git_commit"] == summary["machine"]["git_commit"]
    assert sorted(p.name for p in out.iterdir()) == ["device_check.log", "device_check_cpu.json", "uptrain_tiny_cpu.json"]
    assert not work.exists()  # scratch deleted at the end
