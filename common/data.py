"""Read held-out or training text from a text file, a JSONL file, or a `datasets` dataset.

A data spec is one string: a path to ``.txt``/``.jsonl``/``.json`` file, a folder saved with
``Dataset.save_to_disk`` or holding data files, or a dataset name that ``datasets.load_dataset``
resolves (hub names need network; local ones do not). ``name:split`` picks a split.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or field not in record:
                raise UserError(f"{path}:{line_no} has no {field!r} field")
            texts.append(str(record[field]))
    return texts


def _dataset_texts(spec: str, split: str, field: str) -> list[str]:
    import datasets

    path = Path(spec)
    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(spec, split=split)
    except Exception as err:  # datasets raises many types; the user needs one line either way
        raise UserError(f"cannot load dataset {spec!r}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {spec!r} has no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    if field not in ds.column_names:
        raise UserError(f"dataset {spec!r} has no {field!r} column; it has {', '.join(ds.column_names)}")
    return [str(t) for t in ds[field]]


def read_documents(spec: str | Path, split: str = "train", field: str = "text") -> list[str]:
    """Documents of a data spec, in order. Raises UserError on anything unreadable or empty."""
    spec = str(spec)
    if ":" in spec and not Path(spec).exists():
        spec, split = spec.rsplit(":", 1)
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            docs = _jsonl_texts(path, field)
        else:
            try:
                docs = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError as err:
                raise UserError(f"{path} is not UTF-8 text") from err
    else:
        docs = _dataset_texts(spec, split, field)
    if not any(doc.strip() for doc in docs):
        raise UserError(f"data {spec!r} holds no text")
    return docs


def read_text(spec: str | Path, split: str = "train", field: str = "text") -> str:
    """All documents of a data spec joined by blank lines (for perplexity over one stream)."""
    return "\n\n".join(read_documents(spec, split, field))
