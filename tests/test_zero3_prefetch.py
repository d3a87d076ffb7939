"""ZeRO-3 as it runs on GPUs, on the CPU: DeepSpeed's default thresholds keep a tiny model's
parameters resident and leave nothing to prefetch, so the tests in test_uptrain.py never see a
parameter in flight. With stage3_param_persistence_threshold 0 and a 20,000-element prefetch bucket
(given through the recipe key deepspeed) every parameter is partitioned and the forward pass
prefetches the next ones in DeepSpeed's recorded trace, as a 1.7B model does on a GPU. An eval is a
forward pass with no backward pass to consume what it prefetched: those parameters were still in
flight when the export gathered them ("Cannot partition a param in flight")."""
import json

import pytest
import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from common.sources import load_causal_lm, load_tokenizer
from uptrain import checkpoint, train
from uptrain.data import prepare_data
from uptrain.recipe import load_recipe
from uptrain.train import eval_ppl  # bound here: the fixture below wraps train.eval_ppl

PREFETCHING = {"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 20000}}


@pytest.fixture
def wide(make_source, cli, tmp_path):
    """A tiny FusedKV of bench/e2e_uptrain.py's tiny width (hidden 128, untied): with a 20,000-element
    bucket an eval leaves 10 of its 43 parameters in flight (at hidden 32, one)."""
    out = tmp_path / "wide"
    assert cli("convert", "--source", make_source("wide-src", hidden=128, tied=False), "--out", out) == 0
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def in_flight(engine) -> int:
    return sum(p.ds_status == ZeroParamStatus.INFLIGHT for p in engine.module.parameters())


def held_out_ppl(model_dir, recipe_path) -> float:
    """Perplexity of a reloaded export on the run's own eval sequences, by the run's own eval."""
    recipe = load_recipe(str(recipe_path))
    sequences = prepare_data(recipe, load_tokenizer(model_dir)).eval_sequences
    return eval_ppl(load_causal_lm(model_dir), sequences, recipe.micro_batch, zero3=False)


@pytest.fixture
def export_after_each_eval(monkeypatch, tmp_path, wide):
    """Every eval is followed at once by an export, with no checkpoint between (a checkpoint's save
    releases every parameter first, which hid the bug at a run's last step; an export between
    checkpoints has none). Returns what was seen: the exports with the perplexity their eval logged;
    how many parameters each eval had in flight when it released them (more than 0, or these
    settings prefetched nothing); how many it left in flight (none)."""
    seen = {"exports": [], "in_flight": [], "left_in_flight": []}
    tokenizer = load_tokenizer(wide)
    real_eval, real_release = train.eval_ppl, DeepSpeedEngine.empty_partition_cache

    def release(engine):
        seen["in_flight"].append(in_flight(engine))
        return real_release(engine)

    def eval_then_export(engine, *args):
        ppl = real_eval(engine, *args)
        seen["left_in_flight"].append(in_flight(engine))
        folder = tmp_path / f"export-{len(seen['exports'])}"
        checkpoint.export(engine, tokenizer, folder, torch.float32, "5GB")
        seen["exports"].append((folder, ppl))
        return ppl

    monkeypatch.setattr(DeepSpeedEngine, "empty_partition_cache", release)
    monkeypatch.setattr(train, "eval_ppl", eval_then_export)
    return seen


def test_evals_train_and_exports_with_parameters_in_flight_then_resume(recipe, cli, tmp_path, wide,
                                                                      export_after_each_eval):
    path = recipe(model=str(wide), zero_stage=3, deepspeed=PREFETCHING, budget={"steps": 4}, save_every=2, eval_every=2)
    assert cli("uptrain", "--config", path) == 0
    seen = export_after_each_eval
    assert max(seen["in_flight"]) > 0  # the eval did prefetch: the case the default thresholds never reach
    assert seen["left_in_flight"] == [0, 0, 0]
    straight = metrics(tmp_path / "run")
    assert [folder.name for folder, _ in seen["exports"]] == ["export-0", "export-1", "export-2"]  # steps 0, 2, 4
    for folder, ppl in seen["exports"]:  # each export holds the weights its eval scored
        assert held_out_ppl(folder, path) == pytest.approx(ppl, rel=1e-5)
    assert held_out_ppl(tmp_path / "run" / "final", path) == pytest.approx(straight[-1]["eval_ppl"], rel=1e-5)

    # resumed from the step-2 checkpoint, the same run gives the same steps 3-4, evals and export
    assert cli("uptrain", "--config", path, "--resume-from", "step2") == 0
    resumed = metrics(tmp_path / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), abs=1e-6)
        assert a.get("eval_ppl", 0) == pytest.approx(b.get("eval_ppl", 0), rel=1e-6)
    assert held_out_ppl(tmp_path / "run" / "final", path) == pytest.approx(straight[-1]["eval_ppl"], rel=1e-5)
    assert seen["left_in_flight"] == [0, 0, 0, 0]


def test_a_blend_run_evals_trains_and_exports_with_parameters_in_flight(recipe, cli, tmp_path, wide,
                                                                       export_after_each_eval):
    path = recipe(model=str(wide), zero_stage=3, deepspeed=PREFETCHING, budget={"steps": 4}, eval_every=2, blend_steps=2,
                  blend_schedule="switch")  # whole layers switch: DeepSpeed's recorded module order changes
    assert cli("uptrain", "--config", path) == 0
    assert max(export_after_each_eval["in_flight"]) > 0
    assert export_after_each_eval["left_in_flight"] == [0, 0, 0]
    assert held_out_ppl(tmp_path / "run" / "final", path) == pytest.approx(metrics(tmp_path / "run")[-1]["eval_ppl"],
                                                                         rel=1e-5)
