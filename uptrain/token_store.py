"""The token store: a corpus tokenized once into a memory-mapped file that every rank reads.

A store is a folder, named by a fingerprint of the data spec and of the tokenizer:

    tokens.bin   each document's token ids then EOS, back to back; uint16 when the vocabulary fits, else uint32
    meta.json    token and document counts, dtype, EOS id, both fingerprints, the tokens' sha256, build
                 time (written last)

The build tokenizes with ``datasets.map`` on every core, from the memory-mapped Arrow files
``datasets`` keeps, and writes tokens.bin a batch at a time: its memory is a batch, not the
corpus. It is staged beside its folder (named by host and pid as common/outputs.py names stages, so
the next build removes what a killed one left) and renamed into place, under a file lock: on each node
the first local rank builds it (or takes the one another node built on a shared path) while the
other ranks wait for meta.json. Training reads sequences straight from the map, so a rank's
memory does not grow with the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.console import console, progress
from common.data import DataSpec, cpu_count, is_saved_dataset, load, local_files, local_root, not_utf8
from common.errors import UserError
from common.outputs import made_folder, remove_stale_stages, stage_prefix, user_os_errors, waiting_lock

FORMAT = 2  # 2: meta.json holds the tokens' sha256
WRITE_BATCH = 4096  # documents per batch when copying token ids into tokens.bin
WAIT_SECONDS = 1.0  # how often a waiting rank looks for the finished store


@dataclass
class TokenStore:
    folder: Path
    tokens: np.ndarray  # read-only memory map of every token
    meta: dict

    def sequence_count(self, seq_len: int) -> int:
        return len(self.tokens) // seq_len

    def sequences(self, indices, seq_len: int) -> np.ndarray:
        """(len(indices), seq_len) token ids of the packed sequences at indices (only these bytes are read)."""
        return np.stack([self.tokens[i * seq_len : (i + 1) * seq_len] for i in indices]).astype(np.int64)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the tokenizer's full definition, its class and its EOS."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    if getattr(tokenizer, "is_fast", False):
        digest.update(tokenizer.backend_tokenizer.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(f"eos={tokenizer.eos_token_id} n={len(tokenizer)}".encode())
    return digest.hexdigest()[:16]


def data_fingerprint(spec: DataSpec, max_tokens: int | None) -> str:
    """What decides the documents: the spec, and each local file's path, size and modification time."""
    path = Path(spec.path).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() and is_saved_dataset(path) else local_files(spec)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    key = {"spec": asdict(spec) | {"weight": None}, "files": stats, "max_tokens": max_tokens, "format": FORMAT}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def content_fingerprint(spec: DataSpec) -> str:
    """What the documents are, by content: the sha256 of every local file the spec reads (a resume
    compares it with the run's: a file rewritten in place keeps its path and may keep its size). A hub
    dataset has no local files; its spec stands for it, and the token store's hash for its content."""
    path = Path(spec.path).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() and is_saved_dataset(path) else local_files(spec)
    root = local_root(spec)
    digest = hashlib.sha256(json.dumps(asdict(spec) | {"weight": None}, sort_keys=True).encode())
    for file in (f for f in files if f.is_file()):  # named as under the spec: a moved project is the same data
        digest.update(f"{file.relative_to(root) if root and root.is_dir() else file.name}\0".encode())
        with file.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def tokens_hash(store: TokenStore) -> str:
    """The sha256 of a store's tokens: recorded at the build, read back for a store built before it was."""
    if "sha256" in store.meta:
        return store.meta["sha256"]
    digest = hashlib.sha256()
    with (store.folder / "tokens.bin").open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def store_folder(root: Path, spec: DataSpec, tokenizer, max_tokens: int | None = None) -> Path:
    name = "".join(c if c.isalnum() or c in "._" else "_" for c in Path(spec.path).name or spec.path)[:40]
    return root / f"{name}-{data_fingerprint(spec, max_tokens)}-{tokenizer_fingerprint(tokenizer)}"


def open_store(folder: Path, tokenizer=None) -> TokenStore:
    """A finished store, checked: its meta readable, tokens.bin of the size it states, built by this tokenizer."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        count, dtype = int(meta["tokens"]), np.dtype(meta["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"token store {folder} is damaged (meta.json unreadable); delete the folder to rebuild it") from err
    data = folder / "tokens.bin"
    size = data.stat().st_size if data.is_file() else -1
    if size != count * dtype.itemsize:
        raise UserError(f"token store {folder} is damaged: tokens.bin holds {max(size, 0):,} bytes, meta.json says "
                        f"{count * dtype.itemsize:,}; delete the folder to rebuild it")
    if tokenizer is not None and meta.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise UserError(f"token store {folder} was built with another tokenizer; point data at the corpus, "
                        "or build the store with this model's tokenizer")
    tokens = np.memmap(data, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
    return TokenStore(folder, tokens, meta)


def is_store(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "tokens.bin").exists()



def prepare(spec: DataSpec, tokenizer, root: Path, builder: bool, max_tokens: int | None = None) -> TokenStore:
    """The store of spec: built here when builder (under a lock) and missing, else waited for."""
    if is_store(Path(spec.path)):  # a store built ahead (e.g. --prepare-only), named directly
        return open_store(Path(spec.path), tokenizer)
    folder = store_folder(root, spec, tokenizer, max_tokens)
    if builder:
        with user_os_errors(root), made_folder(root), waiting_lock(folder.with_name(folder.name + ".lock")):
            if not (folder / "meta.json").is_file():
                build(spec, tokenizer, folder, max_tokens)
    else:
        while not (folder / "meta.json").is_file():
            time.sleep(WAIT_SECONDS)
    return open_store(folder, tokenizer)


def _token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _encoder(tokenizer, field: str, eos: int):
    def encode(batch: dict) -> dict:
        texts = [t for t in batch[field] if t and t.strip()]
        # verbose=False: documents longer than model_max_length are packed into windows later
        return {"ids": [ids + [eos] for ids in tokenizer(texts, verbose=False)["input_ids"]]}

    return encode


def _id_batches(tokenized):
    """Flat token ids of the tokenized documents, WRITE_BATCH documents at a time."""
    import datasets

    if isinstance(tokenized, datasets.IterableDataset):
        for batch in tokenized.iter(batch_size=WRITE_BATCH):
            yield np.fromiter((t for ids in batch["ids"] for t in ids), dtype=np.int64), len(batch["ids"])
    else:
        for table in tokenized.with_format("arrow").iter(batch_size=WRITE_BATCH):
            column = table.column("ids").combine_chunks()
            yield column.flatten().to_numpy(zero_copy_only=False), len(column)


def build(spec: DataSpec, tokenizer, folder: Path, max_tokens: int | None = None) -> None:
    """Tokenize spec into a new store at folder (see the module docstring); max_tokens caps a stream."""
    import datasets

    ds = load(spec).select_columns([spec.field])
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    dtype = _token_dtype(tokenizer)
    streaming = isinstance(ds, datasets.IterableDataset)
    procs = 1 if streaming else max(1, min(cpu_count(), len(ds) // 1000))
    tic = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(folder)  # what a killed build left (common/outputs.py's naming says whose it was)
    stage = Path(tempfile.mkdtemp(prefix=stage_prefix(folder), dir=folder.parent))
    try:
        map_args = {} if streaming else {"num_proc": procs if procs > 1 else None,
                                         "cache_file_name": str(stage / "ids.arrow"), "desc": "tokenizing"}
        tokenized = ds.map(_encoder(tokenizer, spec.field, eos), batched=True, remove_columns=[spec.field],
                           **map_args)
        count = documents = 0
        digest = hashlib.sha256()
        with (stage / "tokens.bin").open("wb") as out, progress() as bar:
            task = bar.add_task(f"token store {spec.path}", total=max_tokens)
            for ids, docs in _id_batches(tokenized):
                if max_tokens is not None:
                    ids = ids[: max_tokens - count]
                raw = ids.astype(dtype).tobytes()
                out.write(raw)
                digest.update(raw)
                count, documents = count + len(ids), documents + docs
                bar.update(task, completed=count)
                if max_tokens is not None and count >= max_tokens:
                    break
        for cache in stage.glob("ids*.arrow"):
            cache.unlink()
        if count == 0:
            raise UserError(f"data {spec.path!r} holds no text")
        seconds = time.perf_counter() - tic
        meta = {"format": FORMAT, "tokens": count, "documents": documents, "dtype": dtype.name, "eos": eos,
                "tokenizer": tokenizer_fingerprint(tokenizer), "data": asdict(spec), "sha256": digest.hexdigest(),
                "processes": procs,
                "seconds": round(seconds, 3), "tokens_per_s": round(count / max(seconds, 1e-9))}
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if folder.exists():  # a damaged store (no meta.json) is replaced
            shutil.rmtree(folder)
        os.replace(stage, folder)
    except UnicodeDecodeError as err:  # pyarrow keeps invalid UTF-8 until the text is read
        shutil.rmtree(stage, ignore_errors=True)
        raise not_utf8(spec, err) from err
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    console.print(f"token store {folder}: {count:,} tokens in {documents:,} documents, "
                  f"{seconds:.1f} s ({count / max(seconds, 1e-9) / procs:,.0f} tokens/s per process, {procs} processes)")
