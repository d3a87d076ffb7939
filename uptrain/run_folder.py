"""The run folder: one run writes it at a time, and a resume continues the same run.

``recipe.yaml`` and ``run.json`` (world size) are written when a run starts and never by a
resume, which is checked against them first: a changed key that decides the data order, the model
or the optimizer is refused by name. ``.lock`` is held (flock) by the writing process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import yaml

from common.errors import UserError
from common.outputs import user_os_errors

from .recipe import Recipe, changed_keys


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Hold run_dir's lock for the block; a second run on the same folder is refused in one line."""
    with user_os_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = (run_dir / ".lock").open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{run_dir} is being written by another run ({holder}); wait for it to end or set "
                            "out to another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def check_resume(run_dir: Path, recipe: Recipe, world_size: int) -> None:
    """Refuse a resume whose recipe or world size differs where the run depends on it."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        return  # nothing was started here: the run starts from step 0
    try:
        before = yaml.safe_load(saved.read_text()) or {}
        run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    except (yaml.YAMLError, ValueError) as err:
        raise UserError(f"{saved} or run.json is damaged; start a new run with another out") from err
    changed = changed_keys(before, recipe)
    if changed:
        raise UserError(f"--resume: the recipe changed {', '.join(changed)} since the run started (they decide the "
                        f"data order, the model or the optimizer); restore them or start a new run with another out")
    if run.get("world_size", world_size) != world_size:
        raise UserError(f"--resume: the run started on {run['world_size']} ranks and resumes on {world_size}; "
                        "the data order depends on it: launch with the same number of ranks")


def start(run_dir: Path, recipe: Recipe, world_size: int) -> None:
    """Record the recipe and world size of a run that starts at step 0."""
    with user_os_errors(run_dir):
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=True))
        (run_dir / "run.json").write_text(json.dumps({"world_size": world_size}) + "\n")
