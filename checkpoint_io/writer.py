"""Sharded safetensors writer.

Shards are laid out from the plan's shapes before any tensor is computed, so every shard's header
and every tensor's place are known up front: each shard starts as its header, and tensors are
written in place, in any order and from several threads. A copied tensor whose dtype stays goes
file to file in the kernel (copy_file_range, what `cp` does), while the source scan reads the
same bytes to hash and check them; one whose dtype changes is cast and written (os.pwrite at its
offset) piece by piece as the scan reads it; computed tensors follow one at a time. Peak memory
is a few read buffers plus the largest computed tensor, not a shard. Pieces are raw bytes with
their safetensors dtype name; each is checked finite (numpy: a copy conversion never imports torch).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
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

# bytes per copy_file_range call: large, as `cp` asks (it asks for everything at once)
COPY_BYTES = 1 << 30


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
        check_finite(name, piece, dtype)
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

    def sink(self, name: str, dtype: str) -> TensorSink:
        """Where the source scan sends one copied tensor of dtype."""
        return TensorSink(self, name, dtype)

    def copy_range(self, name: str, fd: int, offset: int) -> None:
        """Copy tensor name's bytes from file fd at offset into place, file to file (same dtype only)."""
        place = self.places[name]
        _copy_bytes(fd, offset, place.fd, place.offset, place.nbytes, name)
        self.written[name] += place.nbytes
        self.on_tensor()

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


def check_finite(name: str, piece: np.ndarray, dtype: str) -> None:
    if not all_finite(piece, dtype):
        raise UserError(f"tensor {name} holds NaN or infinite values; the source is damaged")


class TensorSink:
    """Where one copied tensor goes. A source scan calls it with each piece it reads (where in the
    tensor the piece starts, in bytes; the raw bytes, valid only during the call): checked finite,
    cast to the output dtype and written. When ``kernel_copy`` is set (the dtype stays) a scan
    that reads from a file calls ``copy_range`` once instead and hands each piece to ``check``."""

    def __init__(self, writer: ShardWriter, name: str, dtype: str):
        self.writer, self.name, self.dtype = writer, name, dtype
        self.kernel_copy = dtype == writer.dtype

    def __call__(self, start: int, piece: np.ndarray) -> None:
        self.writer.put(self.name, self.dtype, start, piece)

    def check(self, piece: np.ndarray) -> None:
        check_finite(self.name, piece, self.dtype)

    def copy_range(self, fd: int, offset: int) -> None:
        self.writer.copy_range(self.name, fd, offset)


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


def _copy_bytes(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int, name: str) -> None:
    """nbytes from one file to another at the given offsets: copy_file_range, or reads and writes
    where the kernel cannot copy between these files."""
    done = 0
    while done < nbytes:
        try:
            copied = os.copy_file_range(src, dst, min(COPY_BYTES, nbytes - done), src_offset + done, dst_offset + done)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            copied = _pwrite_all(dst, os.pread(src, min(WRITE_BYTES, nbytes - done), src_offset + done), dst_offset + done)
        if copied == 0:
            raise UserError(f"tensor {name} ends past the end of its shard: the source is truncated")
        done += copied


def _pwrite_all(fd: int, data, offset: int) -> int:
    """os.pwrite every byte, at most WRITE_BYTES per call (a call may also write less than asked); returns the count."""
    view = memoryview(data).cast("B")
    total = len(view)
    while view:
        written = os.pwrite(fd, view[:WRITE_BYTES], offset)
        view, offset = view[written:], offset + written
    return total
