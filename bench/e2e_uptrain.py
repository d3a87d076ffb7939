"""End to end at scale: convert, uptrain under the deepspeed launcher (ZeRO-2 with kill -9 and
--resume, then ZeRO-3), export, validate the export. Writes bench/results/e2e_uptrain_<device>.json.

Everything is made here, nothing is downloaded: a random-weight Llama of the named shape (bf16
safetensors), a byte-level BPE tokenizer trained on the corpus, and the corpus itself, the Python
sources of the installed packages (one document per file).

    python bench/e2e_uptrain.py --shape smollm2-1.7b     # on one H100/H200: about 5 minutes
    python bench/e2e_uptrain.py --shape tiny             # the same steps on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # SmolLM2-1.7B's shape (MHA) with this bench's 32k vocabulary; a tiny one for CPUs
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=2048),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}


def corpus(path: Path, megabytes: int) -> None:
    """JSONL of the installed packages' Python sources, one file a document, up to megabytes."""
    budget = megabytes * 1_000_000
    with path.open("w") as out:
        for source in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
            try:
                text = source.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                out.write(json.dumps({"text": text}) + "\n")
                budget -= len(text)
            if budget <= 0:
                return


def tokenizer(folder: Path, corpus_path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = (json.loads(line)["text"] for line in corpus_path.open())
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            model_max_length=4096).save_pretrained(folder)


def random_model(folder: Path, shape: dict, vocab: int, device: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **shape)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def launcher(device: str) -> list[str]:
    """The deepspeed launcher on a GPU; on a CPU one plain process (the launcher wants accelerators)."""
    if device == "cuda":
        return [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "1", str(ROOT / "run.py")]
    return [sys.executable, str(ROOT / "run.py")]


def uptrain(argv: list[str], device: str, kill_at: Path | None = None) -> float:
    """Run one uptrain job; with kill_at, kill -9 its whole process group once that checkpoint exists."""
    tic = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu"}
    proc = subprocess.Popen([*launcher(device), "uptrain", *argv], cwd=ROOT, env=env, start_new_session=True)
    while kill_at is not None and proc.poll() is None:
        latest = kill_at.parent / "latest"
        if latest.is_file() and latest.read_text().strip() == kill_at.name:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return time.perf_counter() - tic
        time.sleep(0.2)
    if proc.wait() != 0:
        sys.exit(f"uptrain {' '.join(argv)} failed with code {proc.returncode}")
    return time.perf_counter() - tic


def run(argv: list[str]) -> None:
    subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], cwd=ROOT, check=True)


def summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r][1:]  # the first step compiles and warms up
    rates = sorted(r["tokens_per_s"] for r in steps)
    return {"steps": max(r["step"] for r in records), "tokens_per_s_median": round(rates[len(rates) // 2]),
            "gpu_peak_gib": max((r.get("gpu_peak_gib", 0) for r in records), default=0) or None,
            "eval_ppl": [r["eval_ppl"] for r in records if "eval_ppl" in r],
            "export_seconds": json.loads((run_dir / "export.json").read_text())["seconds"]}


def main() -> None:
    import yaml

    from bench.machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-1.7b")
    parser.add_argument("--work", default="/tmp/e2e-uptrain", help="scratch folder (tens of GB at 1.7B)")
    parser.add_argument("--corpus-mb", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings, result = {}, {"shape": args.shape, "seq_len": args.seq_len, "micro_batch": args.micro_batch}
    tic = time.perf_counter()
    corpus(work / "corpus.jsonl", args.corpus_mb)
    tokenizer(work / "source", work / "corpus.jsonl", args.vocab)
    result["params"] = random_model(work / "source", SHAPES[args.shape], args.vocab, device)
    timings["make_model_and_data"] = time.perf_counter() - tic
    tic = time.perf_counter()
    run(["convert", "--source", str(work / "source"), "--layout", "fusedkv", "--out", str(work / "fusedkv")])
    timings["convert"] = time.perf_counter() - tic
    base = {"model": str(work / "fusedkv"), "data": str(work / "corpus.jsonl"), "token_cache": str(work / "tokens"),
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "budget": {"steps": args.steps},
            "warmup_steps": 2, "eval_every": args.steps, "eval_tokens": 4 * args.seq_len, "keep_last": 1,
            "save_every": args.steps // 2, "activation_checkpointing": False}
    for stage in (2, 3):
        recipe = work / f"zero{stage}.yaml"
        recipe.write_text(yaml.safe_dump({**base, "zero_stage": stage, "out": str(work / f"run-zero{stage}")}))
        ckpt = work / f"run-zero{stage}" / "checkpoints"
        if stage == 2:  # kill -9 after the first checkpoint, then resume to the end
            timings["zero2_until_kill"] = uptrain(["--config", str(recipe)], device, kill_at=ckpt / f"step{args.steps // 2}")
            timings["zero2_resume"] = uptrain(["--config", str(recipe), "--resume"], device)
        else:
            timings["zero3"] = uptrain(["--config", str(recipe)], device)
        result[f"zero{stage}"] = summary(work / f"run-zero{stage}")
        shutil.rmtree(ckpt)  # optimizer states: tens of GB at 1.7B
    tic = time.perf_counter()
    run(["validate", "--candidate", str(work / "run-zero3" / "final"), "--source", str(work / "source"),
         "--data", str(work / "corpus.jsonl"), "--max-tokens", str(4 * args.seq_len), "--context", str(args.seq_len),
         "--stride", str(args.seq_len), "--decode-lengths", "128", "--bootstrap", "100", "--out", str(work / "validate")])
    timings["validate"] = time.perf_counter() - tic
    report = json.loads((work / "validate" / "report.json").read_text())
    result["validate_verdict"] = report["verdict"]
    result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    result["machine"] = machine_info()
    out = ROOT / "bench" / "results" / f"e2e_uptrain_{device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
