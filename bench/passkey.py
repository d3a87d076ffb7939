"""Passkey retrieval of SmolLM2-135M and of every layout x init converted from it (no uptraining).

Converts the embedded model to each layout with each initialization (kept under --workdir and
reused), and asks every model for the same keys at the same lengths and depths
(validate/passkey.py). Once a model retrieves no key at a length, its longer lengths are not run
(reported as null): on 2 CPU cores an 8k prompt takes minutes. Writes bench/results/passkey_cpu.json
and prints the table in docs/results.md.

    python bench/passkey.py --set calib_tokens=2048 --set reconstruct_steps=20
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import convert
from bench.machine import machine_info
from common.options import load_options
from common.sources import load_causal_lm, load_tokenizer
from validate import passkey

ROOT = Path(__file__).resolve().parent.parent

INITS = convert.options.INITS


def run_model(model, tokenizer, prompts: list[passkey.Prompt], name: str) -> dict:
    """Lengths in ascending order, stopping after the first length where every answer was wrong."""
    by_length, answers, seconds, kv = {}, [], {}, None
    for length in sorted({p.length for p in prompts}):
        if 0 in by_length.values():
            by_length[length] = None
            continue
        start = time.perf_counter()
        result = passkey.evaluate(model, tokenizer, [p for p in prompts if p.length == length], f"{name} @{length}")
        seconds[length] = time.perf_counter() - start
        answers += result["answers"]
        kv = result["kv_bytes_per_token"]
        by_length[length] = passkey.accuracy(result["answers"], length)
    depths = sorted({p.depth for p in prompts})
    by_depth = {f"{n}@{d:g}": passkey.accuracy(answers, n, d) if by_length[n] is not None else None
                for n in by_length for d in depths}
    return {"accuracy_by_length": by_length, "accuracy_by_length_depth": by_depth, "seconds_by_length": seconds,
            "kv_bytes_per_token": kv, "answers": answers}


def markdown(results: dict, lengths: list[int]) -> str:
    rows = ["| model | KV bytes/token | " + " | ".join(f"{n:,}" for n in lengths) + " |",
            "|---|---:|" + "---:|" * len(lengths)]
    for name, res in results.items():
        cells = ["—" if (a := res["accuracy_by_length"][n]) is None else f"{a:.2f}" for n in lengths]
        rows.append(f"| {name} | {res['kv_bytes_per_token']:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="fusedkv,fusedkv_lite,skipv1,commonkv")
    parser.add_argument("--inits", default=",".join(INITS))
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="convert option for every conversion, e.g. calib_tokens=2048 (repeatable)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-passkey"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "passkey_cpu.json"))
    args = parser.parse_args(argv)

    lengths = [int(n) for n in args.lengths.split(",")]
    tokenizer = load_tokenizer(None)
    prompts = passkey.build_prompts(tokenizer, lengths, [float(d) for d in args.depths.split(",")], args.trials,
                                    args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arms = [("source", None, None)] + [(f"{layout}-{init}", layout, init) for layout in args.layouts.split(",")
                                       for init in args.inits.split(",")
                                       if not (layout == "commonkv" and init == "calibrated")]  # no such fit
    results = {}
    for name, layout, init in arms:
        start = time.perf_counter()
        path = None
        if layout:
            path = Path(args.workdir) / name
            if not (path / "config.json").exists():
                convert.run(load_options(convert.ConvertOptions, overrides=args.set,
                                         flags={"layout": layout, "init": init, "out": str(path), "force": True}))
        convert_seconds = time.perf_counter() - start
        model = load_causal_lm(path, attn_implementation="sdpa").to(device)
        results[name] = {"layout": layout, "init": init, "convert_seconds": convert_seconds,
                         **run_model(model, tokenizer, prompts, name)}
        print(f"{name}: {results[name]['accuracy_by_length']}", flush=True)
        del model
        payload = {"benchmark": "passkey", "machine": machine_info(), "settings": vars(args),
                   "answer_tokens": passkey.answer_tokens(tokenizer), "results": results}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")  # after every arm: a cut run keeps its arms
    print(markdown(results, lengths))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
