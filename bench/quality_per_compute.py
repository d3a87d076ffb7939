"""Held-out perplexity against uptraining tokens: each init (and lm vs kd) next to the control arm.

Uptrains SmolLM2-135M checkpoints made by bench/init_quality.py with the demo recipe (WikiText-2
validation, 1,024-token steps), and the unconverted source with the same recipe (the control),
evaluating every `--eval-every` steps on the same held-out sequences. Writes
bench/results/quality_per_compute.json and .png.

    python bench/quality_per_compute.py --steps 30 --arms control,fusedkv-copy,fusedkv-reconstruct
    python bench/quality_per_compute.py --steps 40 --arms fusedkv-copy-blend20,fusedkv-copy-cosine30
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.machine import machine_info
from checkpoint_io import RunFolder, control_folder
import uptrain
from uptrain.metrics import plot_eval_curves
from uptrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent

RECIPE = ROOT / "configs" / "uptrain-demo-cpu.yaml"
BLEND_SCHEDULES = {"blend": "linear", "cosine": "cosine", "switch": "switch"}  # arm option -> blend_schedule


def arm_settings(arm: str) -> tuple[str, dict]:
    """'control', or '<layout>-<init>' (a checkpoint bench/init_quality.py made) with options after
    it: '-kd' (loss kd), '-blendN', '-cosineN' or '-switchN' (blend_steps N, linear, cosine or switch), e.g.
    'fusedkv-copy-blend20' -> ('fusedkv-copy', {'blend_steps': 20, 'blend_schedule': 'linear'})."""
    if arm == "control":
        return arm, {"control_arm": True}
    layout, init, *options = arm.split("-")
    settings = {}
    for option in options:
        schedule = option.rstrip("0123456789")
        if option == "kd":
            settings["loss"] = "kd"
        elif schedule in BLEND_SCHEDULES and option[len(schedule):]:
            settings.update(blend_steps=int(option[len(schedule):]), blend_schedule=BLEND_SCHEDULES[schedule])
        else:
            raise SystemExit(f"arm {arm}: unknown option {option!r} (kd, blendN, cosineN, switchN)")
    return f"{layout}-{init}", settings


def run_arm(arm: str, workdir: Path, steps: int, eval_every: int) -> list[dict]:
    """One arm (arm_settings) uptrained with the demo recipe for steps."""
    name, settings = arm_settings(arm)
    control = name == "control"
    recipe = load_recipe(RECIPE, flags={
        "out": str(workdir / "runs" / ("source" if control else arm)), "budget": {"steps": steps},
        "eval_every": eval_every, "save_every": steps, "model": None if control else str(workdir / name), **settings})
    shutil.rmtree(control_folder(Path(recipe.out)) if control else recipe.out, ignore_errors=True)
    return RunFolder(uptrain.run(recipe).folder).records()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="control,fusedkv-copy,fusedkv-calibrated,fusedkv-reconstruct,fusedkv-copy-kd")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--no-plot", action="store_true", help="JSON only (bench/quality_suite.py plots the merge)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_per_compute.json"))
    args = parser.parse_args(argv)

    curves, out = {}, Path(args.out)
    for arm in args.arms.split(","):
        curves[arm] = run_arm(arm, Path(args.workdir), args.steps, args.eval_every)
        evals = {arm: [{"tokens": r["tokens"], "step": r["step"], "eval_ppl": r["eval_ppl"]} for r in records if "eval_ppl" in r]
                 for arm, records in curves.items()}
        payload = {"benchmark": "quality_per_compute", "machine": machine_info(), "settings": vars(args),
                   "recipe": str(RECIPE.relative_to(ROOT)), "eval": evals}
        out.write_text(json.dumps(payload, indent=2) + "\n")  # after every arm: a run cut short keeps what it did
    if not args.no_plot:
        plot_eval_curves(curves, out.with_suffix(".png"), "SmolLM2-135M: held-out ppl vs uptraining tokens")
    for arm, points in evals.items():
        print(f"{arm:>24}: " + ", ".join(f"{p['step']}: {p['eval_ppl']:.1f}" for p in points))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
