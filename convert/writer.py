"""Streaming, sharded safetensors writer and atomic output folders.

Shards are laid out from the plan's shapes before any tensor is computed, so each shard's header
is written first and tensors follow one at a time: peak memory is one tensor, not one shard.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from common.errors import UserError

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise UserError(f"cannot read size {text!r}; use e.g. 500MB or 5GB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


def layout_shards(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, max_bytes: int) -> list[list]:
    """Split (name, shape) entries into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    element = torch.tensor([], dtype=dtype).element_size()
    for name, shape in entries:
        nbytes = element * int(torch.Size(shape).numel())
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_shards(folder: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, max_bytes: int,
                 produce: Callable[[str], torch.Tensor], on_tensor: Callable[[], None] = lambda: None) -> None:
    """Write tensors (computed by produce(name), one at a time) into shards with an index when sharded."""
    shards = layout_shards(entries, dtype, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8-byte alignment
        with (folder / file_name).open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape, nbytes in shard:
                tensor = produce(name)
                if tuple(tensor.shape) != tuple(shape):
                    raise UserError(f"tensor {name} came out as {list(tensor.shape)}, expected {list(shape)}")
                tensor = tensor.to(dtype).contiguous()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise UserError(f"tensor {name} holds NaN or infinite values; the source is damaged")
                if nbytes:  # write straight from the tensor's buffer: no second copy in memory
                    fh.write(tensor.view(torch.uint8).numpy().data)
                on_tensor()
        total += offset
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside target; it replaces target only if the block succeeds."""
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:  # KeyboardInterrupt too: never leave a partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
