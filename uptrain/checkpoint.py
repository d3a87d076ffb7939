"""Resumable state (DeepSpeed's own checkpoints, rotated) and the final Hugging Face export."""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from checkpoint_io.dtypes import safetensors_name, tensor_bytes
from checkpoint_io.writer import open_shards
from common.errors import UserError
from common.options import parse_size
from common.outputs import atomic_folder, os_error_line, swap_in

TAG = re.compile(r"^step(\d+)$")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def saved_tags(folder: Path) -> list[str]:
    """Checkpoint tags in folder, oldest first."""
    if not folder.is_dir():
        return []
    found = sorted((int(TAG.match(p.name).group(1)), p.name) for p in folder.iterdir() if p.is_dir() and TAG.match(p.name))
    return [name for _, name in found]


class FileObjectEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, writing through a Python file object: torch's own file
    writer reports a full disk as a RuntimeError without its errno ("unexpected pos"), a Python
    write raises the OSError that says what happened (torch chains it)."""

    def save(self, state_dict, path: str) -> None:
        with open(path, "wb") as fh:
            torch.save(state_dict, _Writer(fh), _use_new_zipfile_serialization=self.zipfile_serialization)


class _Writer:
    """A file without a fileno(): torch then writes through write() instead of the descriptor."""

    def __init__(self, fh):
        self.write, self.flush = fh.write, fh.flush


def save(engine, folder: Path, step: int, keep_last: int, extra: dict) -> None:
    """Save a resumable checkpoint after `step` steps; keep only the newest keep_last.

    Every rank writes into a staging folder (`.stepN.saving`), renamed to stepN once whole, and only
    then is `latest` rewritten (atomically): a failed save (a full disk) removes its own half-written
    folder, leaves `latest` on the previous checkpoint and never touches a stepN saved before (a
    resume from an earlier tag saves it again)."""
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = FileObjectEngine(engine._config)
    tag = f"step{step}"
    staged = folder / f".{tag}.saving"
    rank0 = dist.get_rank() == 0
    if rank0:  # what a killed save left: the run folder is locked, no one else writes it
        shutil.rmtree(staged, ignore_errors=True)
    try:
        engine.save_checkpoint(str(folder), tag=staged.name, client_state={"step": step, "rng": rng_state(), **extra},
                               save_latest=False)
        if rank0:
            swap_in(staged, folder / tag)
            _write_latest(folder, tag)
    except Exception as err:
        shutil.rmtree(staged, ignore_errors=True)
        line = os_error_line(err, folder / tag)
        if line is None:
            raise
        raise UserError(f"{line}; the run can resume from its last checkpoint with --resume") from err
    if rank0:
        for old in saved_tags(folder)[:-keep_last]:
            shutil.rmtree(folder / old, ignore_errors=True)
    dist.barrier()


def _write_latest(folder: Path, tag: str) -> None:
    """`latest` names tag, or (if the write fails) still the tag it named before."""
    staged = folder / ".latest.tmp"
    try:
        staged.write_text(tag)
        os.replace(staged, folder / "latest")
    finally:
        staged.unlink(missing_ok=True)


def resume(engine, folder: Path, tag: str | None = None) -> dict | None:
    """Load checkpoint tag (default: the one `latest` names); returns its client state, or None when
    the run has no checkpoint yet. A missing or damaged checkpoint is one line naming what to do."""
    available = saved_tags(folder)
    latest = folder / "latest"
    if tag is None:
        if not latest.is_file():
            if available:
                raise UserError(f"{latest} is missing; resume from a saved checkpoint with --resume-from "
                                f"{available[-1]} (saved: {', '.join(available)})")
            return None
        tag = latest.read_text().strip()
        if not tag:
            raise UserError(f"{latest} is empty; resume with --resume-from TAG (saved: {', '.join(available) or 'none'})")
    if not (folder / tag).is_dir():
        raise UserError(f"checkpoint {folder / tag} does not exist; resume with --resume-from TAG "
                        f"(saved: {', '.join(available) or 'none'})")
    earlier = [t for t in available if t != tag]
    try:
        _, client_state = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False)
    except Exception as err:  # torch.load and DeepSpeed raise many types on a damaged file
        hint = f"--resume-from {earlier[-1]}" if earlier else "starting the run again"
        raise UserError(f"checkpoint {folder / tag} is damaged ({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); "
                        f"try {hint}") from err
    if client_state is None or "step" not in client_state:
        raise UserError(f"checkpoint {folder / tag} is damaged (no step recorded); resume with --resume-from another tag")
    set_rng_state(client_state["rng"])
    return client_state


@contextlib.contextmanager
def gathered(param, zero3: bool):
    """One parameter whole on every rank (ZeRO-3 keeps only a shard of it on each)."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        yield


def _save_metadata(model, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """Config (with the export dtype), generation config, remote code and tokenizer, as save_pretrained writes them."""
    from transformers.dynamic_module_utils import custom_object_save

    if getattr(model, "_auto_class", None) is not None:
        custom_object_save(model, folder, config=model.config)
    model.config.dtype = dtype
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def export(engine, tokenizer, folder: Path, dtype: torch.dtype, max_shard_size: str,
           params: list[tuple[str, torch.nn.Parameter]] | None = None) -> None:
    """The engine's model as a Hugging Face safetensors folder of the same layout, in dtype.

    One parameter at a time is gathered (ZeRO-3), checked finite, cast and written by rank 0 into
    shards laid out up front (checkpoint_io's writer, as convert writes): GPU memory is one tensor
    above training, host memory one tensor. The folder is staged and renamed into place: a failure
    leaves no half export. params: the named parameters to write (default all of the model's)."""
    model, zero3 = engine.module, engine.zero_optimization_stage() == 3
    if zero3:
        engine.empty_partition_cache()  # parameters an eval prefetched are still in flight: release them first
    name_of_dtype = safetensors_name(dtype)
    params = params or list(model.named_parameters())  # tied weights appear once, as save_pretrained writes them
    shapes = [(name, tuple(getattr(p, "ds_shape", p.shape))) for name, p in params]
    rank0 = dist.get_rank() == 0
    stage = atomic_folder(folder, force=True, markers=("config.json",)) if rank0 else contextlib.nullcontext()
    with stage as tmp:
        shards = open_shards(tmp, shapes, name_of_dtype, parse_size(max_shard_size)) if rank0 else contextlib.nullcontext()
        with shards as writer:
            for name, p in params:
                with gathered(p, zero3):
                    tensor = p.detach().to(dtype)
                    if not torch.isfinite(tensor).all():  # every rank sees the whole tensor: all stop together
                        raise UserError(f"the trained weights hold NaN or inf ({name}); nothing was exported")
                    if rank0:
                        writer.write(name, [(name_of_dtype, tensor_bytes(tensor))])
        if rank0:
            _save_metadata(model, tokenizer, tmp, dtype)
    dist.barrier()
