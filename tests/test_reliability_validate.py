"""Reliability catalogue for validate (issue 18): every fault listed here, by family.

Bad flags are refused in one line with exit 2 before any model or tokenizer is loaded; numbers the
scores cannot give (an interval from one window, the perplexity of a diverged model) are reported
as such, never as a confident result or a traceback; a report that cannot be written is one line.
"""
import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

TEXT = ("The river town grew up around a ford where the water ran shallow over a bed of flat stones. " * 6).strip()
SMALL = ["--max-tokens", 48, "--context", 32, "--stride", 16, "--decode-lengths", "8", "--decode-new-tokens", 2,
         "--bootstrap", 50]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    return path


def error_line(capsys) -> str:
    """stderr's last line, its only error: no traceback, no message over several lines."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error:"), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


def edited_copy(src: Path, dest: Path, edit) -> Path:
    """src copied to dest with its weights changed by edit(state)."""
    shutil.copytree(src, dest)
    state = load_file(dest / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def worse(state):
    torch.manual_seed(1)
    state["model.embed_tokens.weight"] += 0.5 * torch.randn_like(state["model.embed_tokens.weight"])


def overflowing(state):
    """Logits in the millions (the embeddings are tied to the output): mean NLL past exp's range."""
    state["model.embed_tokens.weight"] *= 1e6


def nan_weights(state):
    state["model.layers.0.mlp.up_proj.weight"][:] = math.nan


# --- refused before anything is loaded (the 512-position fixture model; the embedded GGUF's 8192)

@pytest.mark.parametrize("extra,message", [
    pytest.param(["--out", "{tmp}/notes.txt"], "is a file", id="out-is-a-file"),
    pytest.param(["--out", "{tmp}/notes.txt/report"], "is a file", id="out-inside-a-file"),
    pytest.param(["--out", "{tmp}/src/report"], "/src/report is inside the input source", id="out-inside-a-model"),
    pytest.param(["--context", 64, "--stride", 128], "--stride 128 must be at most --context 64",
                 id="stride-past-context"),
    pytest.param(["--context", 2048, "--stride", 256], "--context 2048 is longer than the source's "
                 "max_position_embeddings 512", id="context-past-max-positions"),
    pytest.param(["--decode-lengths", "8,4000"], "--decode-lengths 4000 needs 4017 positions",
                 id="decode-length-past-max-positions"),
    pytest.param(["--decode-lengths", "500"], "--decode-lengths 500 needs 517 positions",  # + warm-up + 16 steps
                 id="decode-steps-past-max-positions"),
    pytest.param(["--source", "default", "--candidate", "default", "--context", 9000, "--stride", 256],
                 "max_position_embeddings 8192", id="context-past-a-gguf-context-length"),
])
def test_bad_flags_are_refused_before_loading(extra, message, make_source, cli, text_file, tmp_path, capsys,
                                             monkeypatch):
    def loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the flags were checked")

    monkeypatch.setattr("validate.stage.load_causal_lm", loading)
    monkeypatch.setattr("validate.stage.load_tokenizer", loading)
    src = make_source()
    (tmp_path / "notes.txt").write_text("mine")
    extra = [str(a).replace("{tmp}", str(tmp_path)) for a in extra]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli("validate", "--source", src, "--candidate", src, "--data", text_file, "--out", tmp_path / "r",
               "--decode-lengths", "8", *extra) == 2
    assert message in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- what the scores cannot say is reported as such

def comparison_line(out: Path) -> str:
    lines = [line for line in (out / "report.md").read_text().splitlines() if "candidate/source ppl ratio" in line]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("edit,windows", [pytest.param(worse, ["--max-tokens", 24], id="one-window"),
                                          pytest.param(overflowing, [], id="diverged-overflow"),
                                          pytest.param(nan_weights, [], id="diverged-nan")])
def test_undefined_numbers_are_reported_as_undefined(edit, windows, make_source, cli, text_file, tmp_path, capsys):
    src = make_source()
    candidate = edited_copy(src, tmp_path / "candidate", edit)
    out = tmp_path / "report"
    code = cli("validate", "--source", src, "--candidate", candidate, "--data", text_file, "--out", out, *SMALL, *windows)
    assert "Traceback" not in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())  # strict JSON: no NaN or Infinity in it
    comparison = report["texts"][0]["comparison"]
    assert comparison["ci_low"] is comparison["ci_high"] is comparison["real_difference"] is None
    line = comparison_line(out)
    assert "real difference" not in line and "not distinguishable" not in line
    if edit is worse:
        assert report["texts"][0]["windows"] == 1 and "CI undefined: 1 window" in line
    else:
        assert code == 1 and not report["verdict"]["pass"] and comparison["diverged"]
        assert report["texts"][0]["perplexity"]["candidate"] is None and comparison["ratio"] is None
        assert "diverged" in line and line.endswith("FAIL")
        ppl_row = next(row for row in (out / "report.md").read_text().splitlines() if row.startswith("| ppl"))
        assert ppl_row.endswith("| inf |")  # the candidate's column


# --- the report cannot be written: one line, no temporary file or half a report left (real failures, the
# first file and an unwritable folder: tests/test_real_write_failures.py; the second file only here, since
# report.md is smaller than report.json and no file-size limit fails it alone)

def test_a_full_disk_at_the_second_report_file_leaves_neither(make_source, cli, text_file, tmp_path, capsys,
                                                              monkeypatch):
    src = make_source()
    out = tmp_path / "new" / "report"
    write_text = Path.write_text

    def full_at_the_markdown(self, *args, **kwargs):
        if self.name.startswith(".report.md"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_the_markdown)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli("validate", "--source", src, "--candidate", src, "--data", text_file, "--out", out, *SMALL) == 2
    line = error_line(capsys)
    assert "disk full while writing" in line and str(out) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- issue 33

def test_a_truncated_candidate_is_one_line(make_source, cli, text_file, tmp_path, capsys):
    src = make_source()
    candidate = tmp_path / "candidate"
    shutil.copytree(src, candidate)
    weights = candidate / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert cli("validate", "--source", src, "--candidate", candidate, "--data", text_file, "--out", tmp_path / "r",
               *SMALL) == 2
    line = error_line(capsys)
    assert f"cannot load a model from {candidate}" in line
    assert not (tmp_path / "r").exists()


def test_defaults_follow_the_models_positions(make_source, cli, text_file, tmp_path, capsys):
    """A 256-position model: the default context (512), stride (256) and decode lengths (128, 512) would
    not fit; each is chosen from the positions and printed, and an explicit value that cannot fit is refused."""
    src = make_source()
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    argv = ["--source", src, "--candidate", src, "--data", text_file, "--max-tokens", 300, "--decode-new-tokens", 2,
            "--bootstrap", 20]
    assert cli("validate", *argv, "--out", tmp_path / "r") == 0
    assert "defaults chosen for the models' 256 positions: --context 256 --stride 128 --decode-lengths 128" in \
        capsys.readouterr().err
    settings = json.loads((tmp_path / "r" / "report.json").read_text())["settings"]
    assert (settings["context"], settings["stride"], settings["decode_lengths"]) == (256, 128, [128])
    assert cli("validate", *argv, "--context", 512, "--out", tmp_path / "r2") == 2
    assert "--context 512 is longer than the source's max_position_embeddings 256" in error_line(capsys)
    assert cli("validate", *argv, "--stride", 300, "--out", tmp_path / "r2") == 2
    assert "--stride 300 must be at most the context, 256" in error_line(capsys)
