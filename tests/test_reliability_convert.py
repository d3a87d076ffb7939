"""Reliability catalogue for convert and run.py (issue 18): every fault listed here, by family.

The promise under test: a user mistake prints one line and exits with code 2, and nothing
half-written is ever left behind; the user's own files are never touched.
"""
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file and folder under folder, hidden ones too, with its bytes: what 'intact' means."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def error_line(capsys) -> str:
    """The one line the user sees for a refusal: stderr's last, and its only error (progress bars
    before it are fine, a traceback or a message over several lines is not)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error:"), err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


# --- --force replaces only a folder convert wrote, and never an input, the current folder or above

def source_inside_out(tmp_path, make_source, monkeypatch):
    src = make_source("D/mysrc")
    (tmp_path / "D" / "notes.txt").write_text("mine")
    return ["--source", src, "--out", tmp_path / "D"], "it holds the input", tmp_path / "D"


def out_is_cwd(tmp_path, make_source, monkeypatch):
    src = make_source()
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "D")
    return ["--source", src, "--out", "."], "it is the current folder", "."


def out_above_cwd(tmp_path, make_source, monkeypatch):
    src = make_source()
    (tmp_path / "D" / "sub").mkdir(parents=True)
    (tmp_path / "D" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "D" / "sub")
    return ["--source", src, "--out", tmp_path / "D"], "or one above it", tmp_path / "D"


def out_not_written_by_convert(tmp_path, make_source, monkeypatch):
    src = make_source()
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "notes.txt").write_text("mine")
    return ["--source", src, "--out", tmp_path / "D"], "has no conversion.json", tmp_path / "D"


def out_is_a_file(tmp_path, make_source, monkeypatch):
    src = make_source()
    (tmp_path / "notes.txt").write_text("mine")
    return ["--source", src, "--out", tmp_path / "notes.txt"], "is a file", tmp_path / "notes.txt"


def calib_text_inside_out(tmp_path, make_source, monkeypatch):
    src = make_source()
    out = tmp_path / "D"
    out.mkdir()
    (out / "conversion.json").write_text("{}")  # an earlier conversion, where the user then kept a text
    (out / "calib.txt").write_text("calibration text " * 50)
    return (["--source", src, "--out", out, "--init", "calibrated", "--calib-text", out / "calib.txt"],
            "it holds the input", out)


@pytest.mark.parametrize("case", [source_inside_out, out_is_cwd, out_above_cwd, out_not_written_by_convert,
                                  out_is_a_file, calib_text_inside_out], ids=lambda case: case.__name__)
def test_force_refuses_to_replace(case, make_source, cli, tmp_path, capsys, monkeypatch):
    argv, message, named = case(tmp_path, make_source, monkeypatch)
    before = snapshot(tmp_path)
    assert cli("convert", *argv, "--force") == 2
    line = error_line(capsys)
    assert message in line and f"{named}" in line
    assert snapshot(tmp_path) == before


# --- a killed conversion: SIGTERM cleans up like Ctrl-C; kill -9's leftovers go with the next run

KILLED = """
import os, signal, sys
import checkpoint_io.writer, run
opened = checkpoint_io.writer.ShardWriter.open
def open_then_signal(self):  # the shards exist, half-written
    opened(self)
    os.kill(os.getpid(), signal.{signal})
checkpoint_io.writer.ShardWriter.open = open_then_signal
sys.exit(run.main(sys.argv[1:]))
"""


def run_killed(signal: str, *argv) -> subprocess.CompletedProcess:
    script = KILLED.format(signal=signal)
    return subprocess.run([sys.executable, "-c", script, "convert", *map(str, argv)], capture_output=True, text=True,
                          timeout=120)


def test_sigterm_cleans_up_like_ctrl_c(make_source, tmp_path):
    src = make_source()
    done = run_killed("SIGTERM", "--source", src, "--out", tmp_path / "out")
    assert done.returncode == 143 and "terminated" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("case", ["kill-9-first-run", "kill-9-while-replacing"])
def test_the_next_run_removes_what_kill_9_left(case, make_source, cli, tmp_path, capsys):
    src, out = make_source(), tmp_path / "out"
    replacing = case == "kill-9-while-replacing"
    if replacing:
        assert cli("convert", "--source", src, "--out", out, "--layout", "skipv1") == 0
    before = snapshot(out) if replacing else None
    assert run_killed("SIGKILL", "--source", src, "--out", out, "--force").returncode == -9
    stages = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(stages) == 1
    capsys.readouterr()
    # the next run on the same output removes it, even one that is then refused
    assert cli("convert", "--source", src, "--out", out) == (2 if replacing else 0)
    err = capsys.readouterr().err
    removed = [line for line in err.splitlines() if line.startswith("removed")]
    assert len(removed) == 1 and stages[0] in removed[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    if replacing:
        assert "already exists" in err and snapshot(out) == before


# --- the disk fills up or the output folder is not writable: one line, nothing kept

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_off_main_thread(write):
    """_pwrite_all that fails in the scan threads only (where casts are written)."""
    def pwrite(*args):
        if threading.current_thread() is not threading.main_thread():
            no_space()
        return write(*args)
    return pwrite


def read_only(folder: Path):
    """os.mkdir as it fails in a folder the user may not write to (the tests run as root, where chmod does not bite)."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)
    return mkdir


@pytest.mark.parametrize("case", ["disk-full-writing-headers", "disk-full-in-a-copy-thread", "disk-full-in-a-cast-thread",
                                  "read-only-parent", "read-only-grandparent"])
def test_os_errors_are_one_line_and_leave_nothing(case, make_source, cli, tmp_path, capsys, monkeypatch):
    import checkpoint_io.writer

    src = make_source()
    (tmp_path / "ro").mkdir()
    out, extra, message = tmp_path / "new" / "out", [], "disk full while writing"
    if case == "disk-full-writing-headers":
        monkeypatch.setattr(checkpoint_io.writer, "_pwrite_all", no_space)
    elif case == "disk-full-in-a-copy-thread":
        monkeypatch.setattr(checkpoint_io.writer, "_copy_bytes", no_space)
    elif case == "disk-full-in-a-cast-thread":
        monkeypatch.setattr(checkpoint_io.writer, "_pwrite_all", full_off_main_thread(checkpoint_io.writer._pwrite_all))
        extra = ["--dtype", "float16"]
    else:
        out = tmp_path / "ro" / "out" if case == "read-only-parent" else tmp_path / "ro" / "new" / "out"
        monkeypatch.setattr(os, "mkdir", read_only(tmp_path / "ro"))
        message = "cannot write"
    before = snapshot(tmp_path)
    assert cli("convert", "--source", src, "--out", out, *extra) == 2
    line = error_line(capsys)
    assert message in line and str(out) in line
    assert snapshot(tmp_path) == before


# --- bad input files and plan values

@pytest.mark.parametrize("text,message", [
    pytest.param(None, "is not UTF-8 text", id="calib-text-not-utf8"),
    pytest.param("force: maybe\n", "force must be true or false, got 'maybe'", id="plan-force-not-a-boolean"),
    pytest.param("dry_run: 2\n", "dry_run must be true or false, got 2", id="plan-dry-run-a-number"),
    pytest.param("layout: [fusedkv\n", "cannot read", id="plan-not-yaml"),
    pytest.param(b"layout: fusedkv # caf\xe9\n", "cannot read", id="plan-not-utf8"),
])
def test_bad_inputs_are_one_line(text, message, make_source, cli, tmp_path, capsys):
    src = make_source()
    if text is None:
        bad = tmp_path / "calib.txt"
        bad.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 40)
        argv = ["--init", "calibrated", "--calib-text", bad]
    else:
        (tmp_path / "plan.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
        argv = ["--config", tmp_path / "plan.yaml"]
    assert cli("convert", "--source", src, "--out", tmp_path / "out", *argv) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,dry", [("no", False), ("Off", False), ("false", False), ("yes", True), ("TRUE", True),
                                       (False, False), (True, True)], ids=repr)
def test_plan_booleans_mean_what_they_say(value, dry, make_source, cli, tmp_path):
    src = make_source()
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"dry_run: {value!r}\n" if isinstance(value, str) else f"dry_run: {str(value).lower()}\n")
    assert cli("convert", "--source", src, "--out", tmp_path / "out", "--config", plan) == 0
    assert (tmp_path / "out").exists() == (not dry)


def test_disk_space_is_checked_where_the_output_will_be(make_source, cli, tmp_path, capsys, monkeypatch):
    """--out's parent does not exist yet: the nearest folder that does is where the bytes go."""
    import convert.stage

    real = convert.stage.shutil.disk_usage
    src = make_source()
    monkeypatch.setattr(convert.stage.shutil, "disk_usage", lambda path: type("usage", (), {"free": 1000})()
                        if Path(path) == tmp_path else real(path))
    assert cli("convert", "--source", src, "--out", tmp_path / "new" / "deeper" / "out") == 2
    assert f"not enough disk space in {tmp_path}" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- run.py: the command line itself

@pytest.mark.parametrize("argv,message", [
    ([], "--help"), (["frobnicate"], "--help"), (["convert", "--bogus"], "--help"), (["convert", "--layout", "mla"], "--help"),
    # option values are checked alike from a flag, --set or --config: by the option's name
    (["validate"], "--candidate"), (["validate", "--candidate", "x", "--context", "many"], "context must be an integer"),
    (["convert", "--set", "calib_tokens=many"], "calib_tokens must be an integer"),
    (["uptrain", "--set", "frobnicate=1"], "unknown option 'frobnicate'"),
], ids=["no-command", "unknown-command", "unknown-flag", "bad-choice", "missing-required", "not-an-integer",
        "set-not-an-integer", "set-unknown-key"])
def test_command_line_errors_are_one_line(argv, message, cli, capsys):
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


# --- issue 33: what still gave a traceback or a wrong line

def null_hidden_size(tmp_path, src):
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = None
    (src / "config.json").write_text(json.dumps(config))
    return ["--source", src, "--out", tmp_path / "out"], "config.json: hidden_size must be an integer, got None"


def dangling_out(tmp_path, src):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    return ["--source", src, "--out", tmp_path / "link"], "is a link to"


def out_under_a_file(tmp_path, src):
    (tmp_path / "afile").write_text("mine")
    return ["--source", src, "--out", tmp_path / "afile" / "sub"], "is a file, not a folder"


def gguf_garbage(tmp_path, src):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return ["--source", tmp_path / "bad.gguf", "--out", tmp_path / "out"], "cannot read"


def huge_reconstruct_lr(tmp_path, src):
    return (["--source", src, "--out", tmp_path / "out", "--init", "reconstruct", "--calib-tokens", 128,
             "--reconstruct-steps", 2, "--reconstruct-lr", "1e30"], "reconstruct diverged on layer 2 at --reconstruct-lr 1e+30")


@pytest.mark.parametrize("case", [null_hidden_size, dangling_out, out_under_a_file, gguf_garbage, huge_reconstruct_lr],
                         ids=lambda case: case.__name__)
def test_faults_found_in_round_two_are_one_line(case, make_source, cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVSHARE_CACHE", str(tmp_path / "cache"))  # a GGUF's dequantized copy would go there
    argv, message = case(tmp_path, make_source())
    before = snapshot(tmp_path)
    assert cli("convert", *argv) == 2
    assert message in error_line(capsys)
    assert snapshot(tmp_path) == before
