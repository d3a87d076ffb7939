"""A real corpus every machine with the project's dependencies has offline: the Python sources of the
installed packages, deduplicated by content and split into train and held-out by content hash, and
a byte-level BPE tokenizer trained on the train split.

The split is a function of each file's bytes alone (its sha256), so a machine with a few packages
more or less puts every shared file on the same side; the manifest's fingerprint (the sorted
content hashes) says whether two corpora are the same.
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

HELD_OUT_PER_MILLE = 20  # 2% of the files, by content hash
MAX_FILE_BYTES = 1_000_000  # generated tables, not code (one file in the project venv)
EVAL_TEXT_BYTES = 400_000  # heldout.txt: about 120k tokens of the 4k BPE
CALIB_TEXT_BYTES = 1_000_000
# the reconstruct init's fit on calib.txt for the mini sources (data/mini-sources/): seconds at their size
RECONSTRUCT_FIT = {"calib_tokens": 65536, "reconstruct_steps": 300}
EOS = "<|endoftext|>"


def python_sources(root: Path | None = None) -> list[Path]:
    return sorted(Path(root or sysconfig.get_paths()["purelib"]).rglob("*.py"))


def is_held_out(digest: str) -> bool:
    return int(digest[:8], 16) % 1000 < HELD_OUT_PER_MILLE


def build(out: Path, root: Path | None = None, train_per_mille: int = 1000) -> dict:
    """train.jsonl and heldout.jsonl (one file a document, in path order) and corpus.json; returns the latter.
    train_per_mille < 1000 keeps that share of the train files (by content hash again): a small corpus
    for a demo or a test, tokenized in seconds."""
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    counts = {"train": [0, 0], "heldout": [0, 0]}  # documents, bytes
    with (out / "train.jsonl.partial").open("w") as train, (out / "heldout.jsonl.partial").open("w") as held:
        for path in python_sources(root):
            try:
                raw = path.read_bytes()
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha256(raw).hexdigest()
            if digest in seen or not text.strip() or len(raw) > MAX_FILE_BYTES:
                continue
            seen.add(digest)
            split = "heldout" if is_held_out(digest) else "train"
            if split == "train" and int(digest[8:16], 16) % 1000 >= train_per_mille:
                continue
            (held if split == "heldout" else train).write(json.dumps({"text": text}) + "\n")
            counts[split][0] += 1
            counts[split][1] += len(raw)
    for split in counts:
        (out / f"{split}.jsonl.partial").rename(out / f"{split}.jsonl")
    eval_text(out)
    manifest = {"what": "Python sources of the installed packages, deduplicated by sha256",
                "root": str(root or sysconfig.get_paths()["purelib"]),
                "fingerprint": hashlib.sha256("".join(sorted(seen)).encode()).hexdigest()[:16],
                "held_out": f"files whose sha256 % 1000 < {HELD_OUT_PER_MILLE}", "train_per_mille": train_per_mille,
                **{f"{split}_documents": n for split, (n, _) in counts.items()},
                **{f"{split}_bytes": b for split, (_, b) in counts.items()}}
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def sample_texts(corpus: Path, max_bytes: int):
    """Documents of a JSONL corpus in content-hash order (a spread over packages, not the first ones
    alphabetically) up to max_bytes."""
    docs = [line for line in corpus.open()]
    docs.sort(key=lambda line: hashlib.sha256(line.encode()).digest())
    total = 0
    for line in docs:
        text = json.loads(line)["text"]
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def text_sample(corpus: Path, out: Path, max_bytes: int) -> Path:
    """A text file of a JSONL corpus's documents in content-hash order (any prefix spreads over many
    packages, where path order would start with one), joined by blank lines, up to max_bytes."""
    if not out.is_file():
        out.with_suffix(".partial").write_text("\n\n".join(sample_texts(corpus, max_bytes)))
        out.with_suffix(".partial").rename(out)
    return out


def eval_text(folder: Path) -> Path:
    """heldout.txt: what validate scores, about 120k tokens of held-out code."""
    return text_sample(folder / "heldout.jsonl", folder / "heldout.txt", EVAL_TEXT_BYTES)


def calib_text(folder: Path) -> Path:
    """calib.txt: train-split code for the reconstruct init's calibration."""
    return text_sample(folder / "train.jsonl", folder / "calib.txt", CALIB_TEXT_BYTES)


def train_tokenizer(folder: Path, texts, vocab: int, max_length: int = 4096) -> None:
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer, no prefix space) with one special token, EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS,
                            model_max_length=max_length).save_pretrained(folder)
