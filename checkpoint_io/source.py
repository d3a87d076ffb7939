"""Source checkpoints: tensors by name, and one scan that hashes the files and feeds the copies.

A folder of safetensors shards: config.json is read as JSON. transformers resolves it only when
a Llama config.json leaves out a shape field (the default is transformers' to know), for the
other families (their defaults differ from Llama's) and when a model is built (calibration), so a
copy conversion of a Llama checkpoint imports neither transformers nor torch. Every header is
parsed and checked up front (byte ranges inside the file that do not overlap, known dtypes).
``scan`` then reads each shard once, front to back, in pieces of at most ``CHUNK_BYTES`` through
two reused numpy buffers (plain reads, no mmap, so touched pages do not pile up in RSS): every
piece goes to the file's sha256, hashed in a thread of its own while the next piece is read, and
every piece of a tensor the writer copies goes to the writer as raw bytes: to be checked finite
while the kernel copies the tensor file to file (its dtype stays), or to be cast and written.
Shards are scanned in parallel, one thread each, up to the number of cores; the kernel copies
run beside them, on half the cores. ``get`` reads one whole tensor as a torch tensor, for the
rules that compute from it. A GGUF file is dequantized through transformers' GGUF loader into
memory (GGUF models are small, quantized files; the dequantized model must fit in RAM). Pickle
checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

import numpy as np

from common.errors import UserError
from common.model_config import read_config
from common.sources import is_gguf, loading_errors
from models import SUPPORTED_SOURCE_TYPES

from .dtypes import ITEMSIZE, TORCH_NAMES, safetensors_name, tensor_bytes
from .writer import TensorSink

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 4 << 20  # stays in the CPU cache from the read to the hash and the write; small next to a real model's tensors
# A Llama config.json that names these is complete for planning; the plan's other fields default
# as in LlamaConfig (plan.TargetConfig).
LLAMA_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
PICKLE_HINT = (
    "pickle checkpoints are never loaded (they can run code); convert once with "
    "`python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('SRC').save_pretrained('DST', safe_serialization=True)\"` in an environment you trust"
)


class TensorSource:
    """Name -> tensor access with shapes and dtypes (safetensors names: F32, BF16, ...) known
    before any tensor is read; the model's config as transformers' object (``config``, imports
    transformers) and as plain fields (``fields``: what the plan needs, cheap where it can be)."""

    model_type: str | None = None
    files: list[Path] = []
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def config(self):
        raise NotImplementedError

    @property
    def fields(self) -> dict:
        return self.config.to_dict()

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def scan(self, sinks: dict[str, TensorSink]) -> dict:
        """Hand every tensor named in sinks to its sink, and return the source's content hash: the
        sha256 of every file (the digests `sha256sum` prints) and one sha256 over that listing."""
        raise NotImplementedError


def _content_hash(digests: dict[str, str]) -> dict:
    """The manifest's source hash from each file's sha256."""
    digests = dict(sorted(digests.items()))
    listing = "".join(f"{digest}  {name}\n" for name, digest in digests.items())
    return {"sha256": hashlib.sha256(listing.encode()).hexdigest(), "files": digests}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK_BYTES))
    with path.open("rb") as fh:
        while size := fh.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


class TensorEntry(NamedTuple):
    """Where one tensor's bytes lie in its shard."""

    path: Path
    offset: int  # absolute, from the start of the file
    nbytes: int


class SafetensorsSource(TensorSource):
    def __init__(self, folder: Path):
        self.folder = folder
        self.raw_config = read_config(folder)
        self.model_type = self.raw_config.get("model_type")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{index} is not a valid safetensors index (no weight_map)") from err
            shard_names = sorted(set(weight_map.values()))
        else:
            shard_names = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
        if not shard_names:
            pickles = [n for n in PICKLE_NAMES if (folder / n).exists()] + [p.name for p in folder.glob("*.bin")]
            if pickles:
                raise UserError(f"{folder / pickles[0]} is a pickle checkpoint: {PICKLE_HINT}")
            raise UserError(f"no *.safetensors weights in {folder}")
        self.files, self.shapes, self.dtypes, self._entries = [], {}, {}, {}
        self._in_file: dict[Path, list[str]] = {}  # each shard's tensors in file order
        for name in shard_names:
            path = folder / name
            if not path.is_file():
                raise UserError(f"the index names shard {name}, which is missing from {folder}")
            self.files.append(path)
            header = _read_header(path)
            self._in_file[path] = list(header)
            for key, (shape, dtype, entry) in header.items():
                self.shapes[key], self.dtypes[key], self._entries[key] = shape, dtype, entry
        if weight_map is not None:
            missing = [k for k, shard in weight_map.items() if k not in self._entries or self._entries[k].path.name != shard]
            if missing:
                raise UserError(f"tensor {missing[0]} is listed in the index but not in shard {weight_map[missing[0]]}")

    @functools.cached_property
    def config(self):
        """transformers' config object (imports transformers: seconds)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.folder))
        except loading_errors() as err:
            raise UserError(f"cannot read {self.folder / 'config.json'}: {str(err).splitlines()[0]}") from err

    @functools.cached_property
    def fields(self) -> dict:
        """config.json as it stands for a complete Llama config (or an unsupported one, refused by
        name later); otherwise resolved by transformers, whose config classes know the defaults."""
        raw = self.raw_config
        if self.model_type not in SUPPORTED_SOURCE_TYPES:
            return dict(raw)
        if self.model_type == "llama" and all(raw.get(k) is not None for k in LLAMA_REQUIRED):
            return dict(raw)
        return self.config.to_dict()

    def get(self, key: str) -> torch.Tensor:
        import torch

        entry = self._entries[key]
        data = torch.empty(entry.nbytes, dtype=torch.uint8)
        with _open(entry.path, key) as fh:
            fh.seek(entry.offset)
            _read_exactly(fh, data.numpy(), entry.path, key)
        return data.view(getattr(torch, TORCH_NAMES[self.dtypes[key]])).view(self.shapes[key])

    def scan(self, sinks: dict[str, TensorSink]) -> dict:
        """One read of every shard, which feeds both its sha256 and the sinks (see the module
        docstring); meanwhile the kernel copies the tensors whose dtype stays, file to file."""
        stop = threading.Event()
        cores = os.cpu_count() or 1
        with (ThreadPoolExecutor(max_workers=max(1, cores // 2), thread_name_prefix="copy") as copier,
              ThreadPoolExecutor(max_workers=min(len(self.files), cores), thread_name_prefix="scan") as pool):
            copies = [copier.submit(self._copy_file, path, sinks, stop) for path in self.files]
            futures = {path.name: pool.submit(self._scan_file, path, sinks, stop) for path in self.files}
            try:
                digests = {name: future.result() for name, future in futures.items()}
                for copy in copies:
                    copy.result()
                return _content_hash(digests)
            finally:
                stop.set()  # on an error or Ctrl-C here, the other shards stop at their next piece or tensor

    def _copy_file(self, path: Path, sinks: dict[str, TensorSink], stop: threading.Event) -> None:
        """The kernel copies of one shard's tensors (copy_file_range: no bytes through this process)."""
        try:
            with _open(path, None) as fh:
                for key in self._in_file[path]:
                    if stop.is_set():
                        return
                    if key in sinks and sinks[key].kernel_copy:
                        sinks[key].copy_range(fh.fileno(), self._entries[key].offset)
        except BaseException:
            stop.set()
            raise

    def _scan_file(self, path: Path, sinks: dict[str, TensorSink], stop: threading.Event) -> str:
        """sha256 of one shard, read front to back once; the pieces of tensors in sinks go to them on the way."""
        digest = hashlib.sha256()
        buffers = [np.empty(CHUNK_BYTES, dtype=np.uint8) for _ in range(2)]
        hashing: list[Future | None] = [None, None]  # the pending hash of each buffer
        try:
            with _open(path, None) as fh, ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as hasher:
                for i, (key, size, start) in enumerate(self._pieces(path, os.fstat(fh.fileno()).st_size)):
                    if stop.is_set():
                        return ""  # another shard failed: its error is the one raised
                    if hashing[i % 2] is not None:
                        hashing[i % 2].result()  # the buffer is free again once its piece is hashed
                    piece = buffers[i % 2][:size]
                    _read_exactly(fh, piece, path, key)
                    hashing[i % 2] = hasher.submit(digest.update, piece)
                    if key in sinks:
                        if sinks[key].kernel_copy:  # its bytes go file to file: the piece is only checked
                            sinks[key].check(piece)
                        else:
                            sinks[key](start, piece)
        except BaseException:
            stop.set()
            raise
        return digest.hexdigest()

    def _pieces(self, path: Path, size: int) -> Iterator[tuple[str | None, int, int]]:
        """(tensor or None, bytes, where in the tensor the piece starts, in bytes) of consecutive
        pieces that cover the file front to back: header, tensors, anything between or after.
        Pieces start at a tensor's start and CHUNK_BYTES is a multiple of every element size, so a
        piece holds whole elements; an empty tensor gets one empty piece, so its sink still sees it."""
        position = 0
        for key in self._in_file[path]:
            entry = self._entries[key]
            if entry.offset > position:
                yield from _unowned(position, entry.offset)
            for start in range(0, max(entry.nbytes, 1), CHUNK_BYTES):
                yield key, min(CHUNK_BYTES, entry.nbytes - start), start
            position = entry.offset + entry.nbytes
        yield from _unowned(position, size)


def _unowned(start: int, end: int) -> Iterator[tuple[None, int, int]]:
    """Pieces of bytes no tensor owns (the header, any gap), hashed only."""
    for offset in range(start, end, CHUNK_BYTES):
        yield None, min(CHUNK_BYTES, end - offset), 0


def _open(path: Path, key: str | None) -> BinaryIO:
    try:
        return path.open("rb", buffering=0)  # unbuffered: every read goes straight into the caller's buffer
    except OSError as err:
        raise UserError(f"cannot read {_what(path, key)}: {err}") from err


def _read_exactly(fh: BinaryIO, into: np.ndarray, path: Path, key: str | None) -> None:
    try:
        size = fh.readinto(memoryview(into))
    except OSError as err:
        raise UserError(f"cannot read {_what(path, key)}: {err}") from err
    if size != len(into):
        raise UserError(f"{path.name} is truncated: {f'tensor {key}' if key else 'its data'} ends past the end of the file")


def _what(path: Path, key: str | None) -> str:
    return f"tensor {key} from {path.name}" if key else path.name


class InMemorySource(TensorSource):
    """A state dict already in memory: a dequantized GGUF, or a model built here."""

    def __init__(self, config, state: dict[str, torch.Tensor], files: list[Path], model=None):
        self._config, self._state, self.files, self.model = config, state, files, model
        self.model_type = config.model_type
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: safetensors_name(v.dtype) for k, v in state.items()}

    @property
    def config(self):
        return self._config

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]

    def scan(self, sinks: dict[str, TensorSink]) -> dict:
        """The tensors are in memory already: each goes to its sink whole; then the files are hashed."""
        for key, sink in sinks.items():
            sink(0, tensor_bytes(self._state[key]))
        return _content_hash({path.name: _sha256_file(path) for path in self.files})


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str, TensorEntry]]:
    """Parse and check a shard header: known dtypes, byte ranges inside the file that match the shapes
    and do not overlap. Tensors come in file order."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            fh.read(1)  # a file that cannot be read says so here, before any output exists
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from err
    try:
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(header_len))
        data_size = size - 8 - header_len
        shapes = {}
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            if not 0 <= start <= end <= data_size:
                raise ValueError(f"tensor {key} lies past the end of the file")
            if meta["dtype"] not in ITEMSIZE:
                raise ValueError(f"tensor {key} has dtype {meta['dtype']}, not one of {', '.join(ITEMSIZE)}")
            shape, dtype = tuple(meta["shape"]), meta["dtype"]
            if end - start != ITEMSIZE[dtype] * math.prod(shape):
                raise ValueError(f"tensor {key} spans {end - start} bytes, its shape {list(shape)} needs another size")
            shapes[key] = (shape, dtype, TensorEntry(path, 8 + header_len + start, end - start))
        in_order = sorted(shapes, key=lambda k: shapes[k][2].offset)
        for before, after in zip(in_order, in_order[1:]):
            if shapes[before][2].offset + shapes[before][2].nbytes > shapes[after][2].offset:
                raise ValueError(f"tensors {before} and {after} overlap")
        return {key: shapes[key] for key in in_order}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"{path.name} is truncated or corrupt ({err})") from err


def open_source(path: Path) -> TensorSource:
    if is_gguf(path):
        from common.sources import load_causal_lm

        model = load_causal_lm(path)
        return InMemorySource(model.config, {k: v.detach() for k, v in model.state_dict().items()}, [path], model)
    if path.is_file():
        if path.name in PICKLE_NAMES or path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise UserError(f"{path} is a pickle checkpoint: {PICKLE_HINT}")
        raise UserError(f"{path} is not a model folder or a .gguf file")
    return SafetensorsSource(path)
