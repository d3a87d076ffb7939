"""Data specs: which texts a stage reads, loaded as `datasets` datasets.

A spec is a string or a mapping (a recipe's ``data`` may also be a list of mappings with weights):

    corpus.txt                 a text file: one document per paragraph (blank-line separated)
    docs/                      a folder: each .txt file one document; .jsonl/.json/.parquet/.csv files as records
    'shards/*.jsonl'           a glob: files of one kind
    saved/                     a folder written by Dataset.save_to_disk
    org/name, org/name:split   a hub dataset (network, or its local cache)
    {path: org/name, name: config, split: train, field: text, streaming: true}

Hub loading goes through ``datasets.load_dataset``; local files through its packaged builders,
which convert them once to memory-mapped Arrow (fingerprint-cached) in the project's cache.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

CACHE = Path(".cache")
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# what datasets says of local files with no record in them
EMPTY = ("corresponds to no data", "at least one example")


@dataclass(frozen=True)
class DataSpec:
    path: str
    split: str = "train"
    name: str | None = None  # a hub dataset's config
    field: str = "text"
    streaming: bool = False  # read as a stream, no Arrow copy: for corpora larger than the disk
    weight: float = 1.0  # share of a mixture's training sequences


SPEC_KEYS = tuple(f.name for f in dataclasses.fields(DataSpec))


def parse_spec(value, split: str = "train") -> DataSpec:
    """One data spec from a string (``path`` or ``path:split``) or a mapping of DataSpec's keys."""
    if isinstance(value, (str, Path)):
        text = str(value)
        if not text.strip():
            raise UserError("a data path is empty; give a file, a folder, a glob or a dataset name")
        if ":" in text and not Path(text).exists() and not text.startswith(("/", ".", "~")):
            text, split = text.rsplit(":", 1)
        return DataSpec(path=text, split=split)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SPEC_KEYS))
        if unknown:
            raise UserError(f"unknown data key {unknown[0]!r}; known: {', '.join(SPEC_KEYS)}")
        if not str(value.get("path") or "").strip():
            raise UserError(f"a data mapping needs a path: {value!r}")
        weight = value.get("weight", 1.0)
        if isinstance(weight, str):
            try:
                weight = float(weight)
            except ValueError:
                pass
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise UserError(f"data weight must be a positive number, got {value.get('weight')!r}")
        return DataSpec(**{"split": split, **value, "path": str(value["path"]), "weight": float(weight)})
    raise UserError(f"a data spec is a path, a dataset name or a mapping, got {value!r}")


def parse_specs(value, split: str = "train") -> list[DataSpec]:
    """A list of specs (a mixture) from a spec or a list of them."""
    specs = [parse_spec(v, split) for v in (value if isinstance(value, list) else [value])]
    if not specs:
        raise UserError("data is an empty list")
    return specs


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", ".", "~")) or Path(path).suffix.lower() in BUILDERS
            or any(c in path for c in "*?[") or not HUB_NAME.match(path))


def local_files(spec: DataSpec) -> list[Path]:
    """The files a local spec reads (empty for a saved dataset or a hub name)."""
    path = Path(spec.path).expanduser()
    if any(c in spec.path for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data {spec.path!r} matches no file")
        return files
    if path.is_file():
        return [path]
    if path.is_dir() and not is_saved_dataset(path):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise UserError(f"data folder {path} holds no {', '.join(sorted(BUILDERS))} files")
        return files
    return []


def local_root(spec: DataSpec) -> Path | None:
    """The file or folder a local spec reads from (a glob's folder before its first wildcard); None
    for a hub name."""
    parts = Path(spec.path).expanduser().parts
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    return root if root.exists() else None


def is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (a second or two, not datasets' 28 s of retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def not_utf8(spec: DataSpec, err: UnicodeDecodeError) -> UserError:
    return UserError(f"data {spec.path} is not UTF-8 text ({err.reason} at byte {err.start})")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_error(spec: DataSpec, err: Exception) -> UserError:
    """The one line for a source datasets could not read, from the reason under its wrappers
    (DatasetGenerationError says only "An error occurred while generating the dataset")."""
    from .outputs import os_error_line

    line = os_error_line(err, CACHE / "datasets")  # a full disk or an unwritable cache, while converting to Arrow
    if line is not None:
        return UserError(line)
    reasons = []
    while err is not None and len(reasons) < 10:
        reasons.append(err)
        err = err.__cause__ or err.__context__
    for reason in reasons:
        if isinstance(reason, UnicodeDecodeError):
            return not_utf8(spec, reason)
        if isinstance(reason, StopIteration) or any(text in str(reason) for text in EMPTY):
            return UserError(f"data {spec.path!r} holds no text")
    wrapped = type(reasons[0]).__name__ == "DatasetGenerationError" and len(reasons) > 1
    return UserError(f"cannot read data {spec.path!r}: {_first_line(reasons[1] if wrapped else reasons[0])}")


def load(spec: DataSpec):
    """The spec as a `datasets` Dataset (IterableDataset when streaming) with its text in spec.field."""
    import datasets

    datasets.disable_progress_bars()  # ours are enough
    path = Path(spec.path).expanduser()
    cache = str(CACHE / "datasets")
    quiet = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs the reason too: our one line says it
    try:
        if path.is_dir() and is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
        elif files := local_files(spec):
            kinds = {BUILDERS[f.suffix.lower()] for f in files}
            if len(kinds) > 1:
                raise UserError(f"data {spec.path!r} mixes {' and '.join(sorted(kinds))} files; give one kind (a glob)")
            kind = kinds.pop()
            # a text file's documents are its paragraphs; in a folder each text file is one document
            options = {"sample_by": "document" if path.is_dir() else "paragraph"} if kind == "text" else {}
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=cache,
                                       streaming=spec.streaming, **options)
        elif _looks_local(spec.path):
            raise UserError(f"data {spec.path} does not exist")
        else:
            if not hub_reachable():
                raise UserError(f"data {spec.path!r} is not a local path and the Hugging Face Hub cannot be reached "
                                "from here (no network?); give a local file or folder")
            ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=spec.streaming,
                                       cache_dir=cache)
    except UserError:
        raise
    except Exception as err:  # datasets and pyarrow raise many types; the user needs one line either way
        raise load_error(spec, err) from err
    finally:
        datasets.logging.set_verbosity(quiet)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if spec.split not in ds:
            raise UserError(f"dataset {spec.path!r} has no split {spec.split!r}; it has {', '.join(ds)}")
        ds = ds[spec.split]
    columns = ds.column_names  # None for a stream whose features its first record will tell
    if columns is not None and spec.field not in columns:
        raise UserError(f"data {spec.path!r} has no {spec.field!r} field; it has {', '.join(columns)}"
                        " (set field: in the data mapping)")
    return ds


def read_documents(spec: str | Path | dict, split: str = "train") -> list[str]:
    """Documents of a small data spec, in order (held-out texts). Raises UserError when empty."""
    parsed = parse_spec(spec, split)
    try:
        docs = [str(t) for t in load(parsed)[parsed.field] if t is not None]
    except UnicodeDecodeError as err:  # pyarrow keeps invalid UTF-8 until the text is read
        raise not_utf8(parsed, err) from err
    if not any(doc.strip() for doc in docs):
        raise UserError(f"data {parsed.path!r} holds no text")
    return docs


def read_text(spec: str | Path | dict, split: str = "train") -> str:
    """One text stream for perplexity: a text file as it is, other specs' documents joined by blank lines."""
    path = Path(str(spec)).expanduser()
    if path.is_file() and BUILDERS.get(path.suffix.lower()) == "text":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not UTF-8 text") from err
        if not text.strip():
            raise UserError(f"data {spec!r} holds no text")
        return text
    return "\n\n".join(read_documents(spec, split))


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
