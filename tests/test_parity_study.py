"""The parity study's bookkeeping: which control an arm is judged against, and results appended by
runners that finish at the same moment (each its own process, as `--arms` runs side by side do)."""
import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import parity_study
from bench.parity_study import parse_arm


def test_a_variant_that_changes_the_schedule_changes_the_control_too():
    arm = parse_arm("fusedkv-reconstruct+lr1x")
    assert (arm.layout, arm.init, arm.control) == ("fusedkv", "reconstruct", "control+lr1x")
    assert arm.recipe == {"lr_share_of_pretraining": 1.0}
    kd = parse_arm("skipv1-copy+kd")  # a loss is the candidate's own: judged against the plain control
    assert kd.control == "control" and kd.recipe == {"loss": "lm+kd"}
    assert parse_arm("control+lr1x").control == "control+lr1x"


@pytest.mark.parametrize("shape,steps,warmup", [("demo", 103, 2), ("mha", 469, 9)])
def test_an_arm_warms_up_over_the_studys_share_of_its_steps(tmp_path, shape, steps, warmup):
    from uptrain.recipe import warmup_length

    recipe = parity_study.arm_recipe(shape, parse_arm("fusedkv-copy+kd"), tmp_path / "model", tmp_path / "run")
    assert recipe.budget == {"steps": steps} and recipe.loss == "lm+kd"
    assert warmup_length(recipe, steps) == warmup  # 2% (UPTRAIN's warmup_share), as the runs before the option had


def test_a_c5_arm_anneals_within_five_percent_of_c_beside_a_control_that_does_too(tmp_path):
    arm = parse_arm("skipv1-reconstruct+kd+lr2x+c5")
    assert arm.control == "control+lr2x+c5"
    steps = parity_study.point_steps("demo")  # the points at the source's batch; c5's run ends at the third
    recipe = parity_study.arm_recipe("demo", arm, tmp_path / "model", tmp_path / "run")
    assert recipe.budget == {"steps": steps[0.05]} and recipe.export_at == tuple(sorted({steps[s] for s in (0.01, 0.025, 0.05)}))


def test_a_c30_arm_runs_past_the_last_point_and_is_measured_at_every_point_and_its_end(tmp_path):
    arm = parse_arm("fusedkv-reconstruct+kd+lr1x+c30")
    assert arm.control == "control+lr1x+c30"
    steps = parity_study.point_steps("mha", arm)
    assert set(steps) == {*parity_study.POINTS, 0.30} and abs(steps[0.30] - 2 * steps[0.15]) <= 1
    recipe = parity_study.arm_recipe("mha", arm, tmp_path / "model", tmp_path / "run")
    assert recipe.budget == {"steps": steps[0.30]}
    assert recipe.export_at == tuple(sorted(step for step in steps.values() if step))


@pytest.mark.parametrize("variant,micro_batch", [("b16", 16), ("b8", 8)])
def test_a_smaller_batch_trains_the_same_tokens_in_more_steps_beside_a_control_that_does_too(tmp_path, variant, micro_batch):
    arm = parse_arm(f"fusedkv-reconstruct+kd+lr1x+{variant}")
    assert arm.control == f"control+lr1x+{variant}"
    factor = 32 // micro_batch  # the source's batch is 32 sequences
    plain, smaller = parity_study.point_steps("mha"), parity_study.point_steps("mha", arm)
    assert all(abs(smaller[share] - factor * plain[share]) <= factor for share in plain)
    recipe = parity_study.arm_recipe("mha", arm, tmp_path / "model", tmp_path / "run")
    assert recipe.micro_batch == micro_batch and recipe.budget == {"steps": smaller[0.15]}
    assert recipe.export_at == tuple(sorted(step for step in smaller.values() if step))
    layerwise = parity_study.arm_recipe("mha", parse_arm(f"fusedkv-reconstruct+layerwise+{variant}"), tmp_path / "m", tmp_path / "r")
    assert layerwise.blend_steps == smaller[0.025]  # the blend's share of C, at the arm's batch too


@pytest.mark.parametrize("variant,key,value,study_value", [("anneal0", "min_lr_ratio", 0.0, 0.1),
                                                           ("wd0", "weight_decay", 0.0, 0.1)])
def test_an_optimizer_variant_changes_the_arm_and_its_control_alike(tmp_path, variant, key, value, study_value):
    """anneal0: a cosine to zero where the study stops at a tenth; wd0: no weight decay."""
    arm = parse_arm(f"fusedkv-reconstruct+kd+lr1x+b16+{variant}")
    assert arm.control == f"control+lr1x+b16+{variant}"
    for name, expected in ((arm.name, value), (arm.control, value), ("fusedkv-reconstruct+kd+lr1x+b16", study_value)):
        recipe = parity_study.arm_recipe("mha", parse_arm(name), tmp_path / "model", tmp_path / "run")
        assert getattr(recipe, key) == expected and recipe.micro_batch == 16


def test_an_unknown_scratch_layout_is_refused_in_one_line_before_any_work(tmp_path):
    script = Path(parity_study.__file__)
    done = subprocess.run([sys.executable, str(script), "scratch", "--scratch", "fusedkv,mla", "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, cwd=script.parent.parent, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("unknown --scratch layout 'mla'; choose from fusedkv, fusedkv_lite, "
                                                   "skipv1, commonkv, sharing_off")
    assert not (tmp_path / "w").exists()  # refused before the corpus is built


@pytest.mark.parametrize("name", ["fusedkv-copy+fast", "fusedkv-bogus", "mla-copy"])
def test_an_unknown_arm_is_refused_in_one_line(name):
    with pytest.raises(SystemExit, match=re.escape(f"unknown arm {name!r}: control or <layout>-<init>")):
        parse_arm(name)


def record_many(results: str, prefix: str, n: int) -> None:
    os.environ["PARITY_RESULTS"] = results
    import importlib

    study = importlib.reload(parity_study)  # RESULTS is read at import, as in every arm's process
    for i in range(n):
        study.record("mha", "arms", f"{prefix}{i}", {"points": [], "i": i})


def test_runners_that_finish_together_lose_no_result(tmp_path):
    context = multiprocessing.get_context("spawn")
    runners = [context.Process(target=record_many, args=(str(tmp_path), prefix, 15)) for prefix in "ab"]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(120)
        assert runner.exitcode == 0
    (path,) = tmp_path.glob("parity_study_*.json")
    arms = json.loads(path.read_text())["shapes"]["mha"]["arms"]
    assert sorted(arms) == sorted(f"{p}{i}" for p in "ab" for i in range(15))
    assert not list(tmp_path.glob("*.partial"))


def scratch_progress(work: str, results: str) -> dict:
    os.environ.update(PARITY_WORK=work, PARITY_RESULTS=results)
    import importlib

    study = importlib.reload(parity_study)
    study.record_scratch_progress("mha")
    return json.loads(study.results_path().read_text())["shapes"]["mha"]["scratch_progress"]


def test_a_scratch_twin_still_training_is_shown_beside_the_source_at_the_same_steps(tmp_path):
    metrics = tmp_path / "work" / "mha" / "scratch" / "fusedkv" / "run" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    lines = [{"step": 0, "eval_ppl": 4000.0}, {"step": 10, "loss": 5.0}, {"step": 156, "eval_ppl": 120.0},
             {"step": 157, "eval_ppl": 119.0}]  # step 157: no source point to stand beside
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # RESULTS and WORK are read at import
        progress = pool.apply(scratch_progress, (str(tmp_path / "work"), str(tmp_path)))
    source = dict(json.loads((parity_study.SOURCES / "mha" / "pretraining.json").read_text())["eval_curve"])
    assert progress["fusedkv"]["points"] == [{"step": 0, "ppl": 4000.0, "source_ppl": source[0]},
                                             {"step": 156, "ppl": 120.0, "source_ppl": source[156]}]
    assert progress["fusedkv"]["steps_of"] == 3124


def test_the_default_study_runs_each_layouts_copy_init_and_its_best_recipe_from_the_results():
    from bench.parity_report import best_arms, final_ratio
    from models import LAYOUTS

    arms = parity_study.default_arms()
    assert arms[0] == "control" and len(arms) == 1 + 2 * len(LAYOUTS)
    assert {parse_arm(a).layout for a in arms if a.endswith("-copy")} == set(LAYOUTS)
    results = json.loads((parity_study.ROOT / "bench" / "results" / "parity_study_cpu.json").read_text())["shapes"]["mha"]["arms"]
    for layout, best in best_arms(results).items():  # the default is the best measured, or within half a percent
        default = results[f"{layout}-{parity_study.BEST_RECIPES[layout]}"]
        assert final_ratio(default) <= final_ratio(results[best]) + 0.005, (layout, best)
