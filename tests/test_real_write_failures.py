"""Real write failures at every point where a stage writes (issue 33), not mocks: a file-size limit
makes the kernel refuse writes as a full disk would, a folder of mode 555 refuses new files (the
child runs without root's permission override). tests/real_failures.py runs the stages in a child
process; each test here is one child running its cases in turn, with HOME a file (so the
home folder cannot be written either: transformers' module cache must not be needed).

The promise checked for each: exit 2, one line naming what could not be written, no traceback,
nothing half-written left, and the previous good checkpoint is the one `--resume` uses.
"""
import json
import stat

import pytest
import yaml

from tests.real_failures import Case, can_drop_permissions, run_cases
from tests.conftest import UPTRAIN_BASE

pytestmark = pytest.mark.skipif(not can_drop_permissions(), reason="root without setpriv cannot be refused a write")
MB = 1 << 20


def leftovers(folder) -> list[str]:
    """Staging files and folders, temporary files and locks under folder; not datasets' own cache
    (.cache/datasets keeps its lock files) nor the lock a run folder that holds a run keeps (run_folder.py)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if (".partial" in p.name or p.name.endswith((".tmp", ".lock")) or ".old-" in p.name)
                  and ".cache" not in p.parts and not (p.name == ".lock" and (p.parent / "recipe.yaml").is_file()))


def read_only(folder):
    folder.mkdir(parents=True)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return folder


@pytest.fixture
def home_file(tmp_path):
    """HOME pointing at a file: nothing can be made under ~/.cache."""
    path = tmp_path / "home-is-a-file"
    path.write_text("")
    return path


def test_uptrain_writes_fail_cleanly_and_resume_from_the_last_good_checkpoint(converted, train_text, tmp_path,
                                                                            monkeypatch, home_file):
    monkeypatch.setenv("HOME", str(home_file))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**UPTRAIN_BASE, "budget": {"steps": 4}, "save_every": 2, "eval_every": 2,
                                      "model": str(converted), "data": str(train_text)}))

    def uptrain(name, *extra, cache="tokens"):
        return ["uptrain", "--config", str(recipe), "--set", f"out={tmp_path / name}",
                "--set", f"token_cache={tmp_path / cache}", *extra]

    read_only(tmp_path / "locked")
    cases = [
        # the token store's tokens.bin (20 kB) past 8 kB; its own, fresh cache
        Case("store", uptrain("store", cache="fresh-tokens"), 8192, "uptrain.token_store:_id_batches:1", before=True),
        # after step 2's checkpoint: step 4's model file (6 MB) fits under 10 MB, its optimizer file (19 MB) does not
        Case("optimizer", uptrain("optimizer"), 10 * MB, "uptrain.checkpoint:save:1"),
        Case("optimizer-resumed", uptrain("optimizer", "--resume")),
        Case("model", uptrain("model"), 1 * MB, "uptrain.checkpoint:save:1"),
        # step 4's folder is whole, then `latest` cannot be rewritten
        Case("latest", uptrain("latest"), 1, "deepspeed:DeepSpeedEngine.save_checkpoint:2"),
        Case("export", uptrain("export"), 1 * MB, "uptrain.checkpoint:save:2"),
        Case("export-resumed", uptrain("export", "--resume")),
        Case("metrics", uptrain("metrics"), 1, "uptrain.metrics:MetricsLog.write:2"),
        Case("unwritable-out", uptrain("locked/run")),
        Case("unwritable-cache", uptrain("cacheless", cache="locked")),
    ]
    result = run_cases(cases, tmp_path)

    line = result["store"].error_line()
    assert "disk full while writing" in line and "fresh-tokens" in line
    assert not (tmp_path / "fresh-tokens").exists() and not (tmp_path / "store").exists()
    for name in ("optimizer", "model", "latest"):
        line = result[name].error_line()
        assert "disk full while writing" in line and "step4 (a file-size limit)" in line and "--resume" in line, name
    # ("optimizer" was resumed since: below); a step4 that is whole but not yet named by `latest` may stay
    for name, kept in (("model", ["latest", "step2"]), ("latest", ["latest", "step2", "step4"])):
        checkpoints = tmp_path / name / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir() if not p.suffix) == kept, name
        assert (checkpoints / "latest").read_text() == "step2" and not (tmp_path / name / "final").exists()
    assert result["optimizer-resumed"].code == 0 and "resumed at step 2" in result["optimizer-resumed"].err
    assert (tmp_path / "optimizer" / "final" / "model.safetensors").is_file()

    assert "disk full while writing" in result["export"].error_line()
    assert (tmp_path / "export" / "checkpoints" / "latest").read_text() == "step4"
    assert result["export-resumed"].code == 0 and (tmp_path / "export" / "final" / "config.json").is_file()

    line = result["metrics"].error_line()
    assert "disk full while writing" in line and "metrics.jsonl" in line
    logged = (tmp_path / "metrics" / "metrics.jsonl").read_text()
    assert logged.endswith("\n") and [json.loads(x)["step"] for x in logged.splitlines()] == [0, 1]

    assert "cannot write" in result["unwritable-out"].error_line() and "permission denied" in \
        result["unwritable-out"].error_line()
    assert not any((tmp_path / "locked").iterdir())
    line = result["unwritable-cache"].error_line()
    assert "cannot write" in line and "locked" in line and "permission denied" in line
    assert leftovers(tmp_path) == []


def test_convert_generate_and_validate_writes_fail_cleanly(make_source, converted, text_file, tmp_path, monkeypatch,
                                                           home_file):
    monkeypatch.setenv("HOME", str(home_file))
    source = make_source("plain")
    unreadable = make_source("unreadable")
    (unreadable / "model.safetensors").chmod(0)
    read_only(tmp_path / "locked")
    small_validate = ["--data", str(text_file), "--max-tokens", "48", "--context", "32", "--stride", "16",
                      "--decode-lengths", "8", "--decode-new-tokens", "2", "--bootstrap", "20"]
    generate = ["generate", "--source", str(source), "--samples", "4", "--batch", "2", "--tokens", "8"]
    cases = [
        Case("convert-shards", ["convert", "--source", str(source), "--out", str(tmp_path / "new" / "conv")], 100_000),
        Case("convert-cast", ["convert", "--source", str(source), "--out", str(tmp_path / "cast"), "--dtype", "float16"],
             100_000),
        Case("convert-unwritable", ["convert", "--source", str(source), "--out", str(tmp_path / "locked" / "conv")]),
        Case("convert-unreadable", ["convert", "--source", str(unreadable), "--out", str(tmp_path / "conv2")]),
        Case("generate-full", [*generate, "--out", str(tmp_path / "gen" / "g.jsonl")], 64),
        Case("generate-unwritable", [*generate, "--out", str(tmp_path / "locked" / "g.jsonl")]),
        # HOME cannot be written: a converted model (remote code) still loads; validate exits 0 or 1 (its verdict)
        Case("generate-converted", ["generate", "--source", str(converted), "--samples", "2", "--batch", "2",
                                    "--tokens", "4", "--out", str(tmp_path / "ok.jsonl")]),
        Case("report-full", ["validate", "--source", str(source), "--candidate", str(converted), *small_validate,
                             "--out", str(tmp_path / "report")], 1000, "validate.report:write_report:1", before=True),
        Case("report-unwritable", ["validate", "--source", str(source), "--candidate", str(converted),
                                   *small_validate, "--out", str(tmp_path / "locked" / "report")]),
        Case("report-converted", ["validate", "--source", str(source), "--candidate", str(converted),
                                  *small_validate, "--out", str(tmp_path / "ok-report")]),
    ]
    result = run_cases(cases, tmp_path)

    line = result["convert-shards"].error_line()
    assert "disk full while writing" in line and str(tmp_path / "new" / "conv") in line
    assert not (tmp_path / "new").exists()
    assert "disk full while writing" in result["convert-cast"].error_line() and not (tmp_path / "cast").exists()
    assert "cannot write" in result["convert-unwritable"].error_line()
    line = result["convert-unreadable"].error_line()
    assert "cannot read" in line and "model.safetensors" in line and "permission denied" in line.lower()
    assert not (tmp_path / "conv2").exists()

    assert "disk full while writing" in result["generate-full"].error_line()
    assert not (tmp_path / "gen").exists()
    assert "cannot write" in result["generate-unwritable"].error_line()
    assert result["generate-converted"].code == 0 and len((tmp_path / "ok.jsonl").read_text().splitlines()) == 2

    assert "disk full while writing" in result["report-full"].error_line()
    assert not (tmp_path / "report").exists()
    assert "cannot write" in result["report-unwritable"].error_line()
    assert result["report-converted"].code in (0, 1) and (tmp_path / "ok-report" / "report.json").is_file()
    assert not any((tmp_path / "locked").iterdir())
    assert leftovers(tmp_path) == []
