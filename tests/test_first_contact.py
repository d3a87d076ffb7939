"""The README's first example, run as a newcomer runs it: a fresh interpreter, no project on the
path, no terminal to answer a prompt. Any prompt or warning it prints is a failure."""
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import WITHOUT_PROJECT

README = Path(__file__).resolve().parent.parent / "README.md"
# tqdm's bars ("Loading weights: 100%|####| 302/302 [...]") report progress, they warn of nothing
PROGRESS_BAR = re.compile(r"^[^\n\r]*\d+%\|[^\n\r]*$")


def readme_example() -> str:
    """The README's first Python block."""
    return re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_readme_example_loads_and_generates_without_prompt_or_warning(make_source, cli, tmp_path):
    code = readme_example()
    folder = re.search(r'AutoTokenizer\.from_pretrained\("([^"]+)"\)', code).group(1)
    user = tmp_path / "user"  # the README's folder, relative to where the user stands
    assert cli("convert", "--source", make_source(), "--layout", "fusedkv", "--out", user / folder) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    run = subprocess.run([sys.executable, "-c", WITHOUT_PROJECT + code], cwd=user, env=env, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    noise = [line for line in re.split(r"[\r\n]+", run.stderr) if line.strip() and not PROGRESS_BAR.match(line)]
    assert noise == [], "\n".join(noise)
    assert not re.search(r"\[y/N\]|trust_remote_code", run.stdout), run.stdout  # input() prompts on stdout


def test_a_converted_folder_is_refused_as_a_source(make_source, cli, tmp_path, capsys):
    # its config.json says "llama", as a source's does, so that AutoTokenizer needs no remote code
    assert cli("convert", "--source", make_source(), "--layout", "skipv1", "--out", tmp_path / "once") == 0
    assert cli("convert", "--source", tmp_path / "once", "--layout", "fusedkv", "--out", tmp_path / "twice") == 2
    assert "already converted (skipv1)" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()
