"""Keeping general ability: which loss and data let a converted model recover on the training text
without losing out-of-domain text and chat behaviour (issue #22, CPU scale).

Starts from one converted checkpoint (default: the FusedKV reconstruct init `make demo` leaves in
runs/demo) and uptrains it with the demo recipe under each arm, the same steps and seed:

    lm-wikitext     next-token loss on WikiText-2 validation (what `make demo` does)
    kd-wikitext     distillation from the source on the same text
    lm+kd-wikitext  both, kd_weight 0.5
    kd-generated    distillation on text the source writes itself from one random token per
                    sample (`run.py generate`, LLM-QAT): no training data at all

Each result, and the checkpoint before uptraining, is judged by `validate.run` against the source:
perplexity on WikiText-2 test and the out-of-domain Python docs, and the behaviour check (greedy
next-token agreement and KL against the source on the 120 shipped chat prompts). Writes
bench/results/keep_ability_cpu.json after every arm.

    python bench/keep_ability.py --steps 10
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from bench.machine import machine_info
import uptrain
import validate
from uptrain.generate import GenerateOptions, run as generate
from uptrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent

RECIPE = ROOT / "configs" / "uptrain-demo-cpu.yaml"
ARMS = {
    "lm-wikitext": {"loss": "lm"},
    "kd-wikitext": {"loss": "kd"},
    "lm+kd-wikitext": {"loss": "lm+kd"},
    "kd-generated": {"loss": "kd", "data": "generated"},
}


def judged(candidate: Path, report: Path, max_tokens: int) -> dict:
    """validate.run against the source: perplexity per text and the behaviour check."""
    shutil.rmtree(report, ignore_errors=True)
    options = validate.ValidateOptions(candidate=str(candidate), max_tokens=max_tokens, behaviour=True,
                                       decode_lengths=(128,), decode_new_tokens=1, out=str(report))
    data = validate.run(options).data
    row = {text["name"]: {"source": text["perplexity"]["source"], "candidate": text["perplexity"]["candidate"]}
           for text in data["texts"]}
    row["behaviour"] = {"agreement": data["behaviour"]["agreement"]["candidate"],
                        "kl": data["behaviour"]["kl"]["candidate"]}
    return row


def generated_text(workdir: Path, tokens: int) -> Path:
    """The source's own text, enough for the run's tokens (kept between runs: it depends only on the seed)."""
    out = workdir / "generated.jsonl"
    if not out.is_file():
        generate(GenerateOptions(out=str(out), samples=-(-tokens // 256), tokens=256, batch=16))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs" / "demo" / "checkpoints" / "fusedkv-reconstruct"),
                        help="the converted checkpoint every arm starts from (default: make demo's FusedKV)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=10, help="uptraining steps of the demo recipe (default 10)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="held-out tokens per text (default 1024)")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "keep_ability"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "keep_ability_cpu.json"))
    args = parser.parse_args(argv)
    model, workdir = Path(args.model), Path(args.workdir)
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} is not a checkpoint: run `make demo` first, or pass --model")
    unknown = [arm for arm in args.arms.split(",") if arm not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")

    rows = {"before uptraining": judged(model, workdir / "reports" / "step0", args.max_tokens)}
    for arm in args.arms.split(","):
        flags = {"model": str(model), "out": str(workdir / "runs" / arm), "budget": {"steps": args.steps},
                 "eval_every": args.steps, "save_every": args.steps, **ARMS[arm]}
        if flags.get("data") == "generated":
            demo = load_recipe(RECIPE)
            flags["data"] = str(generated_text(workdir, args.steps * demo.micro_batch * demo.seq_len))
        recipe = load_recipe(RECIPE, flags=flags)
        shutil.rmtree(recipe.out, ignore_errors=True)
        final = uptrain.run(recipe).final
        rows[arm] = judged(final, workdir / "reports" / arm, args.max_tokens)
        payload = {"benchmark": "keep_ability", "machine": machine_info(), "settings": vars(args),
                   "recipe": str(RECIPE.relative_to(ROOT)), "arms": ARMS, "results": rows}
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")  # after every arm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
