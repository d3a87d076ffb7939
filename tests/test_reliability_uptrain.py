"""uptrain's fault catalogue (issue 18): each fault a user can hit, the one line it gets, and what is
left on disk. Tiny models; DeepSpeed on the CPU."""
import errno
import shutil

import pytest
import torch

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
    with run_folder.locked(tmp_path / "run"):  # as a first run holds it while it trains
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


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(recipe, cli, tmp_path, capsys, monkeypatch):
    import deepspeed

    real_save = deepspeed.DeepSpeedEngine.save_checkpoint

    def full_at_step4(engine, folder, tag=None, **kwargs):
        if tag == "step4":
            (tmp_path / "run" / "checkpoints" / "step4").mkdir()
            (tmp_path / "run" / "checkpoints" / "step4" / "half.pt").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(engine, folder, tag=tag, **kwargs)

    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "save_checkpoint", full_at_step4)
    assert cli("uptrain", "--config", recipe(save_every=2)) == 2
    err = capsys.readouterr().err
    assert "disk full while writing" in err and "--resume" in err
    assert run_dir_state(tmp_path / "run") == (["step2"], "step2")


def test_full_disk_at_the_export_loses_nothing(recipe, cli, tmp_path, capsys, monkeypatch):
    from convert import writer

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(writer, "_pwrite_all", full)
        assert cli("uptrain", "--config", recipe()) == 2
    assert "disk full while writing" in capsys.readouterr().err
    run = tmp_path / "run"
    assert not (run / "final").exists() and not list(run.glob(".final.partial-*"))
    assert run_dir_state(run)[1] == "step6"  # the trained weights are in the last checkpoint
    assert cli("uptrain", "--config", recipe(), "--resume") == 0  # which exports again
    assert (run / "final" / "model.safetensors").is_file()


def test_unwritable_run_folder_is_one_line(recipe, cli, tmp_path, capsys, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(run_folder.Path, "mkdir", denied)
    assert cli("uptrain", "--config", recipe()) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "permission denied" in err and "Traceback" not in err


def test_export_refuses_non_finite_weights(converted):
    """The export's own check, for weights that turn non-finite after the last checked step."""
    from uptrain.checkpoint import export

    class Engine:  # what export reads of a ZeRO-0/1/2 engine
        pass

    import torch.distributed as dist
    from common.sources import load_causal_lm, load_tokenizer

    model = load_causal_lm(converted)
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    if not dist.is_initialized():
        from uptrain.engine import init_distributed

        init_distributed()
    with pytest.raises(UserError, match=r"NaN or inf \(model.norm.weight\); nothing was exported"):
        export(Engine(), model, load_tokenizer(converted), converted.parent / "final", False, torch.float32, "5GB")
    assert not (converted.parent / "final").exists() and not list(converted.parent.glob(".final.partial-*"))
