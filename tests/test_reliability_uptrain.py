"""uptrain's fault catalogue (issues 18, 33): each fault a user can hit, the one line it gets, and what is
left on disk. Tiny models; DeepSpeed on the CPU."""
import json
import shutil

import pytest
import torch

from checkpoint_io import RunFolder
from common.errors import UserError
from uptrain import run_folder, train
from uptrain.recipe import load_recipe

# --set values: numbers and booleans are typed as in every stage; non-finite numbers are refused
TYPED = [
    ("lr=3e-4", "lr", 3e-4),  # YAML 1.1 reads 3e-4 as a string
    ("seq_len=64.0", "seq_len", 64),
    ("offload=yes", "offload", True),
    ("betas=[0.8, 0.9]", "betas", (0.8, 0.9)),
]
REFUSED = [
    ("lr=.inf", "lr must be a finite number"),
    ("lr=.nan", "lr must be a finite number"),
    ("seq_len=64.5", "seq_len must be an integer"),
    ("betas=[0.9]", "betas must be two numbers"),
    ("offload=maybe", "offload must be true or false"),
    ("budget={steps: 2.5}", "budget steps must be an integer"),
    ("data=[]", "data is an empty list"),
]


@pytest.mark.parametrize("override,key,value", TYPED, ids=[t[0] for t in TYPED])
def test_recipe_values_are_read_as_their_types(override, key, value):
    assert getattr(load_recipe(None, [override]), key) == value


@pytest.mark.parametrize("override,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_recipe_values_are_one_line(recipe, cli, capsys, override, message):
    assert cli("uptrain", "--config", recipe(), "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def run_dir_state(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")), \
        (run / "checkpoints" / "latest").read_text() if (run / "checkpoints" / "latest").exists() else None


def test_non_finite_loss_stops_at_that_step_keeps_the_last_checkpoint_and_never_exports(recipe, cli, tmp_path,
                                                                                       capsys, monkeypatch):
    real = train.batch_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "batch_loss", poisoned)
    assert cli("uptrain", "--config", recipe(save_every=2)) == 2
    err = capsys.readouterr().err
    assert "step 3: the training loss is nan" in err and "last good checkpoint is" in err and "step2" in err
    assert not (tmp_path / "run" / "final").exists()
    assert run_dir_state(tmp_path / "run") == (["step2"], "step2")


@pytest.mark.parametrize("lr,message", [(1e9, "the training loss is nan"), (50.0, "perplexity overflowed")],
                         ids=["lr=1e9 (overflow skips)", "lr=50 (diverges)"])
def test_diverging_runs_stop_in_one_line_and_never_export(recipe, cli, tmp_path, capsys, lr, message):
    assert cli("uptrain", "--config", recipe(lr=lr)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()


def test_skipped_steps_are_bounded_by_max_skipped_steps(recipe, cli, tmp_path, capsys, monkeypatch):
    import deepspeed

    real_step = deepspeed.DeepSpeedEngine.step

    def overflowing(engine, *args, **kwargs):  # what fp16 overflow does: the step is skipped and counted
        engine.skipped_steps += 1
        engine.optimizer.zero_grad()

    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "step", overflowing)
    assert cli("uptrain", "--config", recipe(max_skipped_steps=2)) == 2
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "step", real_step)
    assert "step 3: the optimizer skipped 3 steps in a row" in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_is_refused(recipe, cli, tmp_path, capsys):
    with run_folder.locked(RunFolder(tmp_path / "run")):  # as a first run holds it while it trains
        assert cli("uptrain", "--config", recipe()) == 2
    assert "is being written by another run (pid" in capsys.readouterr().err
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_resume_checks_the_recipe_and_the_checkpoints(recipe, cli, tmp_path, capsys, make_source):
    """One finished run, then every way a resume can go wrong, each on a copy of it."""
    path = recipe(save_every=2, keep_last=3)
    assert cli("uptrain", "--config", path) == 0
    done = tmp_path / "run"
    saved_recipe = (done / "recipe.yaml").read_bytes()

    def case(name, damage, *argv):
        run = tmp_path / name
        shutil.copytree(done, run)
        damage(run)
        code = cli("uptrain", "--config", path, "--set", f"out={run}", *argv)
        return code, capsys.readouterr().err, run

    code, err, run = case("changed", lambda run: None, "--resume", "--set", "micro_batch=2", "--set", "seq_len=16")
    assert code == 2 and "the recipe changed micro_batch, seq_len since the run started" in err
    assert (run / "recipe.yaml").read_bytes() == saved_recipe  # never rewritten by a refused resume
    other = make_source("other", layers=2)
    code, err, _ = case("model", lambda run: None, "--resume", "--set", f"model={other}")
    assert code == 2 and "the recipe changed model" in err and "Traceback" not in err
    code, err, _ = case("empty-latest", lambda run: (run / "checkpoints" / "latest").write_text(""), "--resume")
    assert code == 2 and "latest is empty; resume with --resume-from TAG (saved: step2, step4, step6)" in err
    code, err, run = case("deleted", lambda run: shutil.rmtree(run / "checkpoints" / "step6"), "--resume")
    assert code == 2 and "step6 does not exist" in err
    assert cli("uptrain", "--config", path, "--set", f"out={run}", "--resume-from", "step4") == 0
    assert (run / "final" / "config.json").is_file()

    def truncate(run):
        states = run / "checkpoints" / "step6" / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:1000])

    code, err, _ = case("truncated", truncate, "--resume")
    assert code == 2 and "checkpoint" in err and "step6 is damaged" in err and "--resume-from step4" in err
    code, err, run = case("half-line", lambda run: open(run / "metrics.jsonl", "a").write('{"step": 7, "lo'), "--resume")
    assert code == 0 and (run / "final" / "config.json").is_file()  # the half-written line is dropped


# A full disk and unwritable folders at every write: tests/test_real_write_failures.py (real failures, not mocks)


def test_a_resume_refuses_other_data_or_other_tokens(recipe, cli, tmp_path, capsys, train_text):
    """The data file rewritten in place, same path and size: resuming would train on a mix of two texts.
    And a token store whose tokens are not the ones the run started on (run.json's count and hash)."""
    path = recipe(budget={"steps": 2}, save_every=1)
    assert cli("uptrain", "--config", path) == 0
    text, saved = train_text.read_text(), (tmp_path / "run" / "run.json").read_text()
    train_text.write_text(text[len(text) // 2:] + text[: len(text) // 2])  # the same bytes, other sequences
    capsys.readouterr()
    assert cli("uptrain", "--config", path, "--resume-from", "step1") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--resume: data" in line and str(train_text) in line and "changed since the run started" in line
    train_text.write_text(text)  # restored, with a new modification time: a new store of the same tokens
    run = json.loads(saved)
    run["inputs"][0]["sha256"] = "0" * 64  # as if the run had started on other tokens of the same files
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))
    assert cli("uptrain", "--config", path, "--resume-from", "step1") == 2
    err = capsys.readouterr().err
    assert "--resume: the token store of data" in err and "the run started on" in err and "Traceback" not in err
    (tmp_path / "run" / "run.json").write_text(saved)
    assert cli("uptrain", "--config", path, "--resume-from", "step1") == 0


def test_the_control_arm_of_a_plain_model_is_that_model(recipe, cli, tmp_path, capsys, make_source):
    """A model that is no conversion is its own source: never the embedded SmolLM2 in its place."""
    plain = make_source("plain", layers=2)
    assert cli("uptrain", "--config", recipe(budget={"steps": 1}), "--set", f"model={plain}", "--control-arm") == 0
    assert f"control arm: {plain}" in capsys.readouterr().err
    exported = json.loads((tmp_path / "run-control" / "final" / "config.json").read_text())
    assert exported["num_hidden_layers"] == 2 and exported["hidden_size"] == 32
    assert cli("uptrain", "--config", recipe(), "--set", f"model={plain}", "--set", "loss=kd") == 2
    assert "is not a conversion (no conversion.json): set source to the teacher" in capsys.readouterr().err


@pytest.mark.parametrize("where,message", [
    ("out-in-model", "out {model}/run is inside the input model"),
    ("cache-in-model", "token_cache {model}/tokens is inside the input model"),
    ("out-in-data", "is inside the input data"),
    ("out-under-a-file", "is a file, not a folder"),
    ("cache-a-file", "token_cache: {tmp}/afile is a file, not an output folder"),
])
def test_outputs_inside_an_input_or_a_file_are_refused(where, message, recipe, cli, tmp_path, capsys, converted):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text\n")
    overrides = {"out-in-model": {"out": f"{converted}/run"}, "cache-in-model": {"token_cache": f"{converted}/tokens"},
                 "out-in-data": {"data": str(tmp_path / "corpus"), "out": str(tmp_path / "corpus" / "run")},
                 "out-under-a-file": {"out": str(tmp_path / "afile" / "run")},
                 "cache-a-file": {"token_cache": str(tmp_path / "afile")}}[where]
    before = sorted(p.name for p in converted.iterdir())
    assert cli("uptrain", "--config", recipe(**overrides)) == 2
    err = capsys.readouterr().err
    assert message.format(model=converted, tmp=tmp_path) in err and "Traceback" not in err
    assert sorted(p.name for p in converted.iterdir()) == before and (tmp_path / "afile").read_text() == "mine"
    assert not (tmp_path / "run").exists() and sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["a.txt"]


def test_export_refuses_non_finite_weights(converted):
    """The export's own check, for weights that turn non-finite after the last checked step."""
    from uptrain.checkpoint import export

    class Engine:  # what export reads of a ZeRO-0/1/2 engine
        module = None

        def zero_optimization_stage(self):
            return 2

    import torch.distributed as dist
    from common.sources import load_causal_lm, load_tokenizer

    model = load_causal_lm(converted)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    if not dist.is_initialized():
        from uptrain.engine import init_distributed

        init_distributed()
    with pytest.raises(UserError, match=r"NaN or inf \(model.norm.weight\); nothing was exported"):
        engine = Engine()
        engine.module = model
        export(engine, load_tokenizer(converted), converted.parent / "final", torch.float32, "5GB")
    assert not (converted.parent / "final").exists() and not list(converted.parent.glob(".final.partial-*"))
