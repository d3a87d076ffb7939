"""Token store: tokenization throughput, and the training process's peak RSS as the corpus grows.

For each corpus size (synthetic JSONL documents of Zipf-distributed words, SmolLM2's tokenizer):
`run.py uptrain --prepare-only` builds the store (tokens/s per process, wall time, peak RSS), then
`run.py uptrain` trains a tiny random Llama on it for a few steps (peak RSS). The issue's bound:
the training process's peak RSS stays within 200 MB across 1M, 10M and 100M tokens.

    python bench/token_store.py                      # 1M, 10M, 100M tokens (about 15 minutes on 2 cores)
    python bench/token_store.py --sizes 1e6,1e7
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "token_store.json"
TOKENS_PER_WORD = 2.2  # measured for these words with SmolLM2's tokenizer (the store counts the real tokens)


def write_corpus(path: Path, tokens: int, seed: int = 0) -> None:
    """JSONL documents of 50-500 words drawn from a Zipf distribution over 20,000 made-up words."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zi", "an", "el", "or", "us", "ith"])
    vocab = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(20000)]
    words_left = int(tokens / TOKENS_PER_WORD)
    with path.open("w") as out:
        while words_left > 0:
            lengths = rng.integers(50, 500, 1000)
            ids = np.minimum(rng.zipf(1.2, int(lengths.sum())), len(vocab)) - 1
            start = 0
            for n in lengths:
                out.write(json.dumps({"text": " ".join(vocab[i] for i in ids[start : start + n]) + "."}) + "\n")
                start += n
            words_left -= int(lengths.sum())


def tiny_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.sources import load_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_tokenizer(None).save_pretrained(folder)


def run_measured(argv: list[str], cwd: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run.py process (its own, through wait4)."""
    tic = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv], cwd=cwd, stdout=log, stderr=log,
                                env={**os.environ, "DS_ACCELERATOR": "cpu"})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - tic
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"{' '.join(argv)} failed:\n{log.read()[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    import yaml

    from bench.machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7,1e8", help="corpus sizes in tokens, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="training steps on each store")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="token-store-bench-"))
    rows = []
    try:
        tiny_model(work / "model")
        for size in (int(float(s)) for s in args.sizes.split(",")):
            corpus = work / f"corpus-{size}.jsonl"
            write_corpus(corpus, size)
            recipe = work / f"recipe-{size}.yaml"
            recipe.write_text(yaml.safe_dump({
                "model": str(work / "model"), "data": str(corpus), "out": str(work / f"run-{size}"),
                "token_cache": str(work / "tokens"), "seq_len": 256, "micro_batch": 4, "budget": {"steps": args.steps},
                "eval_every": args.steps, "save_every": args.steps, "eval_tokens": 1024}))
            build_s, build_rss = run_measured(["uptrain", "--config", str(recipe), "--prepare-only"], work)
            meta = json.loads(next((work / "tokens").glob("*/meta.json")).read_text())
            train_s, train_rss = run_measured(["uptrain", "--config", str(recipe)], work)
            rows.append({"corpus_tokens": meta["tokens"], "corpus_mb": round(corpus.stat().st_size / 1e6, 1),
                         "build_seconds": round(build_s, 1), "tokenize_seconds": meta["seconds"],
                         "tokens_per_s_per_process": round(meta["tokens"] / meta["seconds"] / meta["processes"]),
                         "processes": meta["processes"], "build_peak_rss_mb": round(build_rss / 1e6),
                         "train_seconds": round(train_s, 1), "train_peak_rss_mb": round(train_rss / 1e6)})
            print(json.dumps(rows[-1]), flush=True)
            corpus.unlink()
            shutil.rmtree(work / "tokens")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    spread = max(r["train_peak_rss_mb"] for r in rows) - min(r["train_peak_rss_mb"] for r in rows)
    result = {"machine": machine_info(), "rows": rows, "train_peak_rss_spread_mb": spread}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"training peak RSS spread across sizes: {spread} MB -> {RESULTS}")


if __name__ == "__main__":
    main()
