"""Source checkpoints, read lazily by tensor name.

A folder of safetensors shards: every header is parsed and checked up front (byte ranges inside
the file, known dtypes); tensor bytes are read only when the writer asks for that tensor, with
plain reads at the offsets the header gives (no mmap, so touched pages do not pile up in RSS).
``chunks`` streams a tensor through one reused buffer, so copying a tensor costs a buffer, not
the tensor. A GGUF file is dequantized through transformers' GGUF loader into memory (GGUF
models are small, quantized files; the dequantized model must fit in RAM). Pickle checkpoints
are refused, never unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from common.errors import UserError
from common.sources import is_gguf

from .writer import SAFETENSORS_DTYPES

CHUNK_BYTES = 4 << 20  # stays in the CPU cache between the read and the write; small next to a real model's tensors
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
PICKLE_HINT = (
    "pickle checkpoints are never loaded (they can run code); convert once with "
    "`python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('SRC').save_pretrained('DST', safe_serialization=True)\"` in an environment you trust"
)


class TensorSource:
    """Name -> tensor access with shapes and dtypes known before any tensor is read."""

    config = None
    files: list[Path] = []
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def chunks(self, key: str) -> Iterator[torch.Tensor]:
        """The tensor's elements, flat and in order, a bounded piece at a time; each piece is only
        valid until the next one is asked for (the buffer is reused)."""
        raise NotImplementedError

    def content_hash(self) -> dict:
        """sha256 of every source file (the digests `sha256sum` prints), files hashed in parallel,
        and one sha256 over that listing to name the whole source."""
        with ThreadPoolExecutor(max_workers=min(len(self.files), os.cpu_count() or 1)) as pool:
            digests = dict(sorted(zip((p.name for p in self.files), pool.map(_sha256_file, self.files))))
        listing = "".join(f"{digest}  {name}\n" for name, digest in digests.items())
        return {"sha256": hashlib.sha256(listing.encode()).hexdigest(), "files": digests}

    def content_hash_async(self) -> Future:
        """content_hash in a thread (hashing and reads release the GIL), overlapping the writes."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        future = pool.submit(self.content_hash)
        pool.shutdown(wait=False)
        return future


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
        self.config = _load_config(folder)
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
        for name in shard_names:
            path = folder / name
            if not path.is_file():
                raise UserError(f"the index names shard {name}, which is missing from {folder}")
            self.files.append(path)
            for key, (shape, dtype, entry) in _read_header(path).items():
                self.shapes[key], self.dtypes[key], self._entries[key] = shape, dtype, entry
        if weight_map is not None:
            missing = [k for k, shard in weight_map.items() if k not in self._entries or self._entries[k].path.name != shard]
            if missing:
                raise UserError(f"tensor {missing[0]} is listed in the index but not in shard {weight_map[missing[0]]}")
        self._buffer: torch.Tensor | None = None

    def get(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        data = torch.empty(entry.nbytes, dtype=torch.uint8)
        self._read(key, entry.offset, data)
        return data.view(self.dtypes[key]).view(self.shapes[key])

    def chunks(self, key: str) -> Iterator[torch.Tensor]:
        entry = self._entries[key]
        if self._buffer is None:
            self._buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8)  # a multiple of every element size
        for start in range(0, entry.nbytes, CHUNK_BYTES):
            piece = self._buffer[: min(CHUNK_BYTES, entry.nbytes - start)]
            self._read(key, entry.offset + start, piece)
            yield piece.view(self.dtypes[key])

    def _read(self, key: str, offset: int, into: torch.Tensor) -> None:
        path = self._entries[key].path
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                size = fh.readinto(memoryview(into.numpy()))
        except OSError as err:
            raise UserError(f"cannot read tensor {key} from {path.name}: {err}") from err
        if size != len(into):
            raise UserError(f"{path.name} is truncated: tensor {key} ends past the end of the file")


class InMemorySource(TensorSource):
    """A state dict already in memory: a dequantized GGUF, or a model built here."""

    def __init__(self, config, state: dict[str, torch.Tensor], files: list[Path], model=None):
        self.config, self._state, self.files, self.model = config, state, files, model
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]

    def chunks(self, key: str) -> Iterator[torch.Tensor]:
        flat = self._state[key].reshape(-1)
        step = CHUNK_BYTES // flat.element_size()
        for start in range(0, flat.numel(), step):
            yield flat[start : start + step]


def _load_config(folder: Path):
    from transformers import AutoConfig

    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json")
    try:
        json.loads(path.read_text())
        return AutoConfig.from_pretrained(str(folder))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from err


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype, TensorEntry]]:
    """Parse and check a shard header: known dtypes, byte ranges inside the file that match the shapes."""
    size = path.stat().st_size
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
            if meta["dtype"] not in TORCH_DTYPES:
                raise ValueError(f"tensor {key} has dtype {meta['dtype']}, not one of {', '.join(TORCH_DTYPES)}")
            shape, dtype = tuple(meta["shape"]), TORCH_DTYPES[meta["dtype"]]
            if end - start != dtype.itemsize * torch.Size(shape).numel():
                raise ValueError(f"tensor {key} spans {end - start} bytes, its shape {list(shape)} needs another size")
            shapes[key] = (shape, dtype, TensorEntry(path, 8 + header_len + start, end - start))
        return shapes
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
