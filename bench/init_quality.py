"""Step-0 perplexity of SmolLM2-135M converted to each layout with each initialization.

Converts the embedded model with copy, calibrated and reconstruct (default settings), keeps the
checkpoints under --workdir for bench/quality_per_compute.py, and scores every one on the same
WikiText-2 test tokens. Writes bench/results/init_quality.json.

    python bench/init_quality.py --layouts fusedkv,fusedkv_lite,skipv1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.machine import machine_info
import convert
from common.options import load_options, parse_override
from common.sources import default_wikitext, load_causal_lm, load_tokenizer
from validate.perplexity import score_windows

ROOT = Path(__file__).resolve().parent.parent

INITS = ("copy", "calibrated", "reconstruct")


def write(args: argparse.Namespace, ids: torch.Tensor, results: dict) -> None:
    payload = {"benchmark": "init_quality", "machine": machine_info(), "settings": vars(args),
               "held_out": f"WikiText-2 test, first {len(ids)} tokens, context 512 stride 256", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="fusedkv,fusedkv_lite,skipv1")
    parser.add_argument("--inits", default=",".join(INITS))
    parser.add_argument("--tokens", type=int, default=4096, help="WikiText-2 test tokens scored")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="convert option for every conversion, e.g. calib_tokens=32768 (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the checkpoint and result names, for a sweep")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "init_quality.json"))
    args = parser.parse_args(argv)

    ids = torch.tensor(load_tokenizer(None)(default_wikitext("test").read_text())["input_ids"][: args.tokens])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the conversions' fits pick the GPU the same way
    results = {"source": {"ppl": score_windows(load_causal_lm(None).to(device), ids, 512, 256, "source").perplexity}}
    print(f"source: {results['source']['ppl']:.2f}", flush=True)
    overrides = dict(parse_override(item) for item in args.set)
    for layout in args.layouts.split(","):
        for init in args.inits.split(","):
            name = f"{layout}-{init}{args.tag}"
            out = Path(args.workdir) / name
            start = time.perf_counter()
            if not (out / "config.json").exists():
                convert.run(load_options(convert.ConvertOptions, overrides=args.set,
                                         flags={"layout": layout, "init": init, "out": str(out), "force": True}))
            seconds = time.perf_counter() - start
            ppl = score_windows(load_causal_lm(out).to(device), ids, 512, 256, name).perplexity
            results[name] = {"layout": layout, "init": init, "convert_options": overrides, "ppl": ppl,
                             "convert_seconds": seconds, "ppl_vs_source": ppl / results["source"]["ppl"],
                             "checkpoint": str(out)}
            print(f"{name}: {ppl:.1f} ({seconds:.0f} s)", flush=True)
            write(args, ids, results)  # after every arm: a run cut short still leaves its results
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
