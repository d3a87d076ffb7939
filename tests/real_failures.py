"""Real write failures for the catalogue tests: stages run in a child process whose writes really fail.

A full disk is a file-size limit (RLIMIT_FSIZE) with SIGXFSZ ignored: every write past the limit
fails with EFBIG, in our code, in torch's and in DeepSpeed's, as it would on a full disk. A folder
that cannot be written is a folder of mode 555, with the child run under `setpriv` without the
capabilities that let root ignore permissions (the tests run as root).

One child runs several cases in turn (imports once: torch, transformers and DeepSpeed cost seconds).
A case may lower the limit only when a function has been called n times ("the disk fills up after
the first checkpoint"): the failure itself is still the kernel's, nothing is patched to raise.

    python tests/real_failures.py CASES.json     (what `run_cases` starts)
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETPRIV = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


@dataclasses.dataclass
class Case:
    name: str
    argv: list[str]  # run.py's arguments
    limit: int | None = None  # file-size limit in bytes, None: none
    after: str | None = None  # "module:attribute.path:n": set the limit once that is called the nth time (on return)
    before: bool = False  # ... or as that call starts


@dataclasses.dataclass
class Result:
    code: int | str  # exit code, or "traceback" when run.main raised
    err: str  # what the case printed to stderr

    def error_line(self) -> str:
        """The one error line, after checking it is the only one and there is no traceback."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert "Traceback" not in self.err and lines and lines[-1].startswith("error:"), self.err
        assert sum(line.startswith("error:") for line in lines) == 1, self.err
        return lines[-1]


def can_drop_permissions() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def run_cases(cases: list[Case], cwd: Path, timeout: int = 600) -> dict[str, Result]:
    """Run the cases in one child process (in cwd, without root's permission override); their results by name."""
    spec = cwd / ".cases.json"
    spec.write_text(json.dumps([dataclasses.asdict(c) for c in cases]))
    command = [sys.executable, str(Path(__file__).resolve()), str(spec)]
    if os.geteuid() == 0:
        command = SETPRIV + command
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    spec.unlink()
    results = {}
    for match in re.finditer(r"^=== case (?P<name>\S+)\n(?P<err>.*?)^=== exit (?P<code>\S+)$", done.stderr, re.S | re.M):
        code = match["code"]
        results[match["name"]] = Result(int(code) if code.lstrip("-").isdigit() else code, match["err"])
    assert len(results) == len(cases), done.stderr[-5000:]
    return results


# --- the child

def _resolve(path: str):
    """(owner, attribute name) of "module:attr.path"."""
    module, attrs = path.split(":")
    owner = importlib.import_module(module)
    *outer, name = attrs.split(".")
    for attr in outer:
        owner = getattr(owner, attr)
    return owner, name


def _set_limit(size: int | None) -> None:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY if size is None else size, hard))


def _arm(case: Case):
    """Set the case's limit now, or wrap the function it names to set it at its nth call; returns the undo."""
    if case.after is None:
        _set_limit(case.limit)
        return lambda: None
    where, count = case.after.rsplit(":", 1)
    owner, name = _resolve(where)
    original, calls = getattr(owner, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        if case.before and len(calls) == int(count):
            _set_limit(case.limit)
        result = original(*args, **kwargs)
        if not case.before and len(calls) == int(count):
            _set_limit(case.limit)
        return result

    setattr(owner, name, counted)
    return lambda: setattr(owner, name, original)


def child(spec: Path) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    import run

    for raw in json.loads(spec.read_text()):
        case = Case(**raw)
        print(f"=== case {case.name}", file=sys.stderr, flush=True)
        undo = _arm(case)
        try:
            code = run.main(case.argv)
        except SystemExit as exit_:
            code = exit_.code
        except BaseException:  # what the promise forbids: shown as it is, counted as a traceback
            traceback.print_exc()
            code = "traceback"
        finally:
            undo()
            _set_limit(None)
        print(f"\n=== exit {code}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    child(Path(sys.argv[1]))
