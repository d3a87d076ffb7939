"""Source checkpoints, read lazily by tensor name.

A folder of safetensors shards is opened with ``safe_open``: headers are parsed and checked up
front, tensor bytes are read only when the writer asks for that tensor. A GGUF file is
dequantized through transformers' GGUF loader into memory (GGUF models are small, quantized
files; the dequantized model must fit in RAM). Pickle checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.errors import UserError
from common.sources import is_gguf

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
PICKLE_HINT = (
    "pickle checkpoints are never loaded (they can run code); convert once with "
    "`python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('SRC').save_pretrained('DST', safe_serialization=True)\"` in an environment you trust"
)


class TensorSource:
    """Name -> tensor access with shapes known before any tensor is read."""

    config = None
    files: list[Path] = []

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def content_hash(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(path.name.encode())
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()


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
        self.files, self.shapes, self.dtypes, self._owner = [], {}, {}, {}
        for name in shard_names:
            path = folder / name
            if not path.is_file():
                raise UserError(f"the index names shard {name}, which is missing from {folder}")
            self.files.append(path)
            for key, (shape, dtype) in _read_header(path).items():
                self.shapes[key], self.dtypes[key], self._owner[key] = shape, dtype, path
        if weight_map is not None:
            missing = [k for k, shard in weight_map.items() if self._owner.get(k, Path()).name != shard]
            if missing:
                raise UserError(f"tensor {missing[0]} is listed in the index but not in shard {weight_map[missing[0]]}")

    def get(self, key: str) -> torch.Tensor:
        try:
            with safe_open(str(self._owner[key]), framework="pt") as fh:
                return fh.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read tensor {key} from {self._owner[key].name}: {err}") from err


class InMemorySource(TensorSource):
    """A state dict already in memory: a dequantized GGUF, or a model built here."""

    def __init__(self, config, state: dict[str, torch.Tensor], files: list[Path], model=None):
        self.config, self._state, self.files, self.model = config, state, files, model
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]


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


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parse and check a shard header: declared byte ranges must lie inside the file."""
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
            shapes[key] = (tuple(meta["shape"]), meta["dtype"])
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
