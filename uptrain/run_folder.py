"""The run folder as uptrain writes it (its files: checkpoint_io/run_folder.py): one run writes it at
a time, and a resume continues the same run.

``recipe.yaml`` and ``run.json`` (world size; each data source's content fingerprint and its token
store's count and hash) are written when a run starts and never by a resume, which is checked
against them first: a changed key that decides the data order, the model or the optimizer is
refused by name, and so is data whose content changed (a file rewritten in place keeps its path and
may keep its size) or a token store that holds other tokens. ``.lock`` is held (flock) by the
writing process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
from collections.abc import Iterator

import yaml

from checkpoint_io.run_folder import RunFolder
from common.errors import UserError
from common.outputs import user_os_errors

from .data import eval_specs, train_specs
from .recipe import Recipe, changed_keys
from .token_store import content_fingerprint


@contextlib.contextmanager
def locked(folder: RunFolder) -> Iterator[None]:
    """Hold the run folder's lock for the block; a second run on the same folder is refused in one
    line. A run that fails before it wrote anything takes the folder it made away again."""
    run_dir = folder.path
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    with user_os_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = folder.lock.open("a+")
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
    except BaseException:
        if made and list(run_dir.iterdir()) == [folder.lock]:
            folder.lock.unlink()
            for path in made:  # innermost first
                with contextlib.suppress(OSError):
                    path.rmdir()
        raise
    finally:
        handle.close()  # closing releases the lock


def check_resume(folder: RunFolder, recipe: Recipe, world_size: int) -> None:
    """Refuse a resume whose recipe, world size or data content differs where the run depends on it
    (before any token store is built: changed data would build a new one)."""
    before = folder.recipe()
    if before is None:
        return  # nothing was started here: the run starts from step 0
    run = folder.run_record()
    changed = changed_keys(before, recipe)
    if changed:
        raise UserError(f"--resume: the recipe changed {', '.join(changed)} since the run started (they decide the "
                        f"data order, the model or the optimizer); restore them or start a new run with another out")
    if run.get("world_size", world_size) != world_size:
        raise UserError(f"--resume: the run started on {run['world_size']} ranks and resumes on {world_size}; "
                        "the data order depends on it: launch with the same number of ranks")
    specs = train_specs(recipe) + eval_specs(recipe)
    for entry, spec in zip(run.get("inputs", []), specs):  # a run started before inputs were recorded has none
        if entry.get("content") != content_fingerprint(spec):
            raise UserError(f"--resume: data {spec.path} changed since the run started (its content differs); "
                            "restore it or start a new run with another out")


def check_inputs(folder: RunFolder, inputs: list[dict]) -> None:
    """A resumed run's token stores hold exactly the tokens it started with (count and sha256)."""
    for before, now in zip(folder.run_record().get("inputs", []), inputs):
        if (before.get("tokens"), before.get("sha256")) != (now["tokens"], now["sha256"]):
            raise UserError(f"--resume: the token store of data {now['data']} holds {now['tokens']:,} tokens "
                            f"(sha256 {now['sha256'][:12]}), the run started on {before.get('tokens'):,} "
                            f"({str(before.get('sha256'))[:12]}); restore the data and tokenizer or start a new run "
                            "with another out")


def start(folder: RunFolder, recipe: Recipe, world_size: int, inputs: list[dict]) -> None:
    """Record the recipe, world size and inputs (TrainData.inputs) of a run that starts at step 0."""
    with user_os_errors(folder.path):
        folder.recipe_file.write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=True))
        folder.run_file.write_text(json.dumps({"world_size": world_size, "inputs": inputs}) + "\n")
