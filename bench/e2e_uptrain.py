"""End to end at scale: convert, uptrain under the deepspeed launcher (ZeRO-2 with kill -9 and
--resume, then ZeRO-3), export, validate the export. Writes e2e_uptrain_<device>.json into --out
(default bench/results), the validate verdict in it whichever way it went. bench/device_check.py
uses its pieces (corpus, tokenizer, random model, launcher) for the one-call GPU check.

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
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from checkpoint_io import RunFolder

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # SmolLM2-1.7B's shape (MHA) with this bench's 32k vocabulary; a tiny one for CPUs
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=2048),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
}


def python_files(folder: Path):
    """folder's .py files in sorted order, read lazily (a GPU image's site-packages holds 100k+ files)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        yield from (Path(root) / name for name in sorted(files) if name.endswith(".py"))


def corpus(path: Path, megabytes: int) -> None:
    """JSONL of the installed packages' Python sources, one file a document, up to megabytes."""
    budget = megabytes * 1_000_000
    with path.open("w") as out:
        for source in python_files(Path(sysconfig.get_paths()["purelib"])):
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


def random_model(folder: Path, shape: dict, vocab: int, device: str, dtype: str = "bfloat16") -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, **shape)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(device: str, launched: bool | None = None) -> list[str]:
    """The deepspeed launcher (its runner module: the `deepspeed` script need not be on PATH, as after
    `pip install --target`), by default on a GPU only; else one plain process. With one process the
    launcher also runs on the CPU accelerator (bench/device_check.py's DRY run uses it there)."""
    if device == "cuda" if launched is None else launched:
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
                str(ROOT / "run.py")]
    return [sys.executable, str(ROOT / "run.py")]


class JobFailed(RuntimeError):
    """A job exited with an error, or outlasted its time and was killed."""


def bounded(cmd: list[str], timeout: float | None = None, log=None, env: dict | None = None, until=None) -> int | None:
    """Run cmd from the project root in a process group of its own (a launcher and its ranks die
    together), output to log (default: inherited). Returns its exit code, or None once until() said
    True and the group was killed -9; past timeout the group is killed and JobFailed raised."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT if log else None)
    while proc.poll() is None:
        stop = until is not None and until()
        if stop or (timeout is not None and time.perf_counter() - tic > timeout):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if stop:
                return None
            raise JobFailed(f"{' '.join(map(str, cmd))} outlasted its {timeout:.0f} s and was killed")
        time.sleep(0.2)
    return proc.returncode


def uptrain(argv: list[str], device: str, kill_at: Path | None = None, timeout: float | None = None,
            log=None, while_running=None, launched: bool | None = None) -> float:
    """Run one uptrain job (under the launcher: see launcher()); its seconds. With kill_at, kill -9 its
    whole process group once that checkpoint is `latest`; while_running() is called between polls.
    Raises JobFailed when it fails, outlasts timeout, or ends before kill_at."""
    tic = time.perf_counter()
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if device == "cuda" else "cpu", "PYTHONUNBUFFERED": "1"}

    def checkpointed() -> bool:
        if while_running is not None:
            while_running()
        latest = kill_at.parent / "latest" if kill_at is not None else None
        return latest is not None and latest.is_file() and latest.read_text().strip() == kill_at.name

    code = bounded([*launcher(device, launched), "uptrain", *argv], timeout, log, env, until=checkpointed)
    if code is not None and (code != 0 or kill_at is not None):
        raise JobFailed(f"uptrain {' '.join(argv)} " + (f"failed with code {code}" if code
                                                        else f"ended before its {kill_at.name} checkpoint"))
    return time.perf_counter() - tic


def run(argv: list[str], ok=(0,)) -> int:
    """run.py with argv; an exit code outside ok (validate's 1 is a verdict, not a failure) stops the script."""
    code = subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], cwd=ROOT).returncode
    if code not in ok:
        sys.exit(f"run.py {' '.join(argv)} failed with code {code}")
    return code


def summary(run: RunFolder) -> dict:
    records = run.records()
    steps = [r for r in records if "tokens_per_s" in r][1:]  # the first step compiles and warms up
    rates = sorted(r["tokens_per_s"] for r in steps)
    return {"steps": max(r["step"] for r in records), "tokens_per_s_median": round(rates[len(rates) // 2]),
            "gpu_peak_gib": max((r.get("gpu_peak_gib", 0) for r in records), default=0) or None,
            "eval_ppl": [r["eval_ppl"] for r in records if "eval_ppl" in r],
            "export_seconds": run.export_seconds()}


def main() -> None:
    import yaml

    from bench.machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="smollm2-1.7b")
    parser.add_argument("--work", default="/tmp/e2e-uptrain", help="scratch folder (tens of GB at 1.7B)")
    parser.add_argument("--corpus-mb", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024, or the shape's context if shorter")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the result JSON")
    args = parser.parse_args()
    args.seq_len = args.seq_len or min(1024, SHAPES[args.shape]["max_position_embeddings"])
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
        folder = RunFolder(work / f"run-zero{stage}")
        try:
            if stage == 2:  # kill -9 after the first checkpoint, then resume to the end
                timings["zero2_until_kill"] = uptrain(["--config", str(recipe)], device, kill_at=folder.checkpoints / f"step{args.steps // 2}")
                timings["zero2_resume"] = uptrain(["--config", str(recipe), "--resume"], device)
            else:
                timings["zero3"] = uptrain(["--config", str(recipe)], device)
        except JobFailed as err:
            sys.exit(str(err))
        result[f"zero{stage}"] = summary(folder)
        shutil.rmtree(folder.checkpoints)  # optimizer states: tens of GB at 1.7B
    tic = time.perf_counter()
    run(["validate", "--candidate", str(RunFolder(work / "run-zero3").final), "--source", str(work / "source"),
         "--data", str(work / "corpus.jsonl"), "--max-tokens", str(4 * args.seq_len), "--context", str(args.seq_len),
         "--stride", str(args.seq_len), "--decode-lengths", "128", "--bootstrap", "100", "--out", str(work / "validate")], ok=(0, 1))
    timings["validate"] = time.perf_counter() - tic
    report = json.loads((work / "validate" / "report.json").read_text())
    result["validate_verdict"] = report["verdict"]
    result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    result["machine"] = machine_info()
    out = Path(args.out) / f"e2e_uptrain_{device}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
