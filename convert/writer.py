"""Sharded safetensors writer and atomic output folders.

Shards are laid out from the plan's shapes before any tensor is computed, so every shard's header
and every tensor's place are known up front: each shard starts as its header, and tensors are
written in place (os.pwrite at their offset), piece by piece, in any order and from several
threads (the source scan hands copied tensors over as it reads them, shard by shard in parallel;
computed tensors follow one at a time). Peak memory is a few read buffers plus the largest computed
tensor, not a shard. Pieces are raw bytes with their safetensors dtype name; each is checked
finite and cast to the output dtype on the way (numpy: a copy conversion never imports torch).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import struct
import tempfile
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common.errors import UserError

from .dtypes import ITEMSIZE, TORCH_NAMES, all_finite, cast

# Page-cache writes cost more kernel time per byte in large calls on the 2-core VM of
# bench/results/convert.json (Linux 6.18, ext4): 2.7 GB written after a few idle seconds took a
# median 11.0 s in 4 MiB calls and 7.5 s in 256 KiB calls, interleaved; another time 11.6 s
# against 1.1-1.9 s for 64-512 KiB calls (1 MiB: 7.1 s).
WRITE_BYTES = 256 << 10

# Where a copied tensor's pieces go: sink(where in the tensor the piece starts, in bytes, its raw bytes
# as uint8). A piece is only valid during the call (its buffer is reused). ShardWriter.sink makes
# them (knowing the tensor's dtype); a source's scan feeds them.
Sink = Callable[[int, np.ndarray], None]


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise UserError(f"cannot read size {text!r}; use e.g. 500MB or 5GB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


def layout_shards(entries: list[tuple[str, tuple[int, ...]]], dtype: str, max_bytes: int) -> list[list]:
    """Split (name, shape) entries into shards of at most max_bytes (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    element = ITEMSIZE[dtype]
    for name, shape in entries:
        nbytes = element * math.prod(shape)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    if current:
        shards.append(current)
    return shards


class Place(NamedTuple):
    """Where one tensor goes: its shard's file descriptor, its absolute offset and size there."""

    fd: int
    offset: int
    nbytes: int
    shape: tuple[int, ...]


class ShardWriter:
    """Tensors written in place into shards laid out up front (see the module docstring)."""

    def __init__(self, folder: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str, max_bytes: int,
                 on_tensor: Callable[[], None]):
        self.folder, self.dtype, self.on_tensor = folder, dtype, on_tensor
        self.shards = layout_shards(entries, dtype, max_bytes)
        self.names = (["model.safetensors"] if len(self.shards) == 1 else
                      [f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))])
        self.places: dict[str, Place] = {}
        self.written = {name: 0 for name, _ in entries}  # bytes; each tensor is written by one thread at a time
        self.fds: list[int] = []

    def open(self) -> None:
        """Create every shard with its header (no ftruncate to the final size first: measured slower)."""
        for shard, file_name in zip(self.shards, self.names):
            header = _shard_header(shard, self.dtype)
            fd = os.open(self.folder / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            self.fds.append(fd)
            _pwrite_all(fd, header, 0)
            offset = len(header)
            for name, shape, nbytes in shard:
                self.places[name] = Place(fd, offset, nbytes, shape)
                offset += nbytes

    def put(self, name: str, dtype: str, start: int, piece: np.ndarray) -> None:
        """Write raw bytes of tensor name, whose elements are dtype, from byte start on (counted in
        dtype): checked finite, cast to the output dtype."""
        if not all_finite(piece, dtype):
            raise UserError(f"tensor {name} holds NaN or infinite values; the source is damaged")
        if dtype != self.dtype:
            try:
                piece = cast(piece, dtype, self.dtype)
            except ValueError as err:
                raise UserError(f"tensor {name}: {err}") from err
            start = start // ITEMSIZE[dtype] * ITEMSIZE[self.dtype]
            if not all_finite(piece, self.dtype):
                raise UserError(f"tensor {name} overflows {TORCH_NAMES[self.dtype]}; choose a wider --dtype")
        place = self.places[name]
        if start + piece.nbytes > place.nbytes:
            self._wrong_size(name, start + piece.nbytes)
        if piece.nbytes:  # straight from the piece's memory: no second copy
            _pwrite_all(place.fd, piece, place.offset + start)
        self.written[name] += piece.nbytes
        if self.written[name] == place.nbytes:
            self.on_tensor()

    def sink(self, name: str, dtype: str) -> Sink:
        """put for one tensor of dtype, as the source scan calls it."""
        return functools.partial(self.put, name, dtype)

    def write(self, name: str, pieces: Iterable[tuple[str, np.ndarray]]) -> None:
        """A whole tensor as (dtype, raw bytes) pieces in order."""
        start = 0
        for dtype, piece in pieces:
            self.put(name, dtype, start, piece)
            start += piece.nbytes
        self._check(name)

    def finish(self) -> None:
        """Check that every tensor was written whole, and write the index when there is more than one shard."""
        for name in self.places:
            self._check(name)
        if len(self.shards) > 1:
            weight_map = {name: file_name for shard, file_name in zip(self.shards, self.names) for name, _, _ in shard}
            total = sum(nbytes for shard in self.shards for _, _, nbytes in shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def _check(self, name: str) -> None:
        if self.written[name] != self.places[name].nbytes:
            self._wrong_size(name, self.written[name])

    def _wrong_size(self, name: str, nbytes: int) -> None:
        place = self.places[name]
        raise UserError(f"tensor {name} came out as {nbytes} bytes, its shape {list(place.shape)} needs {place.nbytes}")


@contextlib.contextmanager
def open_shards(folder: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str, max_bytes: int,
                on_tensor: Callable[[], None] = lambda: None) -> Iterator[ShardWriter]:
    """A ShardWriter for (name, shape) entries of output dtype (a safetensors name); on leaving,
    every tensor must have been written."""
    writer = ShardWriter(folder, entries, dtype, max_bytes, on_tensor)
    try:
        writer.open()
        yield writer
        writer.finish()
    finally:
        writer.close()


def _shard_header(shard: list, dtype: str) -> bytes:
    """A shard's safetensors header, length prefix included."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, nbytes in shard:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


def _pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite every byte, at most WRITE_BYTES per call (a call may also write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view[:WRITE_BYTES], offset)
        view, offset = view[written:], offset + written


@contextlib.contextmanager
def atomic_folder(target: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside target; it replaces target only if the block succeeds."""
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the checkpoint should read like any folder made here
    try:
        yield tmp
        if target.exists():  # --force: the old folder is removed only once the new one is in place
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(aside / target.name)
            try:
                tmp.rename(target)
            except BaseException:
                (aside / target.name).rename(target)
                raise
            finally:
                shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:  # KeyboardInterrupt too: never leave a partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
