"""Resumable state (DeepSpeed's own checkpoints, rotated) and the final Hugging Face export."""
from __future__ import annotations

import contextlib
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG = re.compile(r"^step(\d+)$")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, folder: Path, step: int, keep_last: int, extra: dict) -> None:
    """Save a resumable checkpoint after `step` steps; keep only the newest keep_last."""
    engine.save_checkpoint(str(folder), tag=f"step{step}", client_state={"step": step, "rng": rng_state(), **extra})
    if dist.get_rank() == 0:
        tags = sorted((int(TAG.match(p.name).group(1)), p) for p in folder.iterdir() if p.is_dir() and TAG.match(p.name))
        for _, old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def resume(engine, folder: Path) -> dict | None:
    """Load the latest checkpoint; returns its client state (step, RNG, ...) or None when there is none."""
    if not (folder / "latest").is_file():
        return None
    _, client_state = engine.load_checkpoint(str(folder), load_module_strict=False)
    set_rng_state(client_state["rng"])
    return client_state


def export(engine, model, tokenizer, folder: Path, zero_stage: int) -> None:
    """The trained model as an HF safetensors folder of the same layout (gathered from ZeRO-3 shards)."""
    import deepspeed

    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else contextlib.nullcontext()
    with gather:
        if dist.get_rank() == 0:
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    dist.barrier()

