"""One installable project (`pip install -e .`, make venv): every package imports from anywhere, no
script puts the checkout on sys.path itself, and `kvshare` is `python run.py`."""
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import run
from tests.conftest import WITHOUT_PROJECT

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = re.search(r"'common'.*'demo'", WITHOUT_PROJECT).group(0).replace("'", "").split(", ")


def test_kvshare_is_run_py():
    (script,) = entry_points(group="console_scripts", name="kvshare")
    assert script.load() is run.main


def test_every_package_imports_from_outside_the_checkout(tmp_path):
    probe = f"import {', '.join(PACKAGES)}; import bench.machine, convert.cli, uptrain.cli, validate.cli"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_script_edits_sys_path():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = [name for name in tracked
                 if re.search(r"sys\.path\.(insert|append)|noqa:\sE402", (ROOT / name).read_text())]
    assert offenders == [] and tracked
