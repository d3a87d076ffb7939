"""Quality per compute on SmolLM2-135M: every layout x init at step 0, then uptraining curves.

Splits the work into independent streams (one per layout, the kd arms, the control arm), each
running bench/init_quality.py then bench/quality_per_compute.py in its own work folder, `--jobs` of
them at a time: on one GPU the 135M model leaves the card mostly idle, so streams side by side
finish in a fraction of the serial time (their convert_seconds then include the contention).
Merges the streams' results into init_quality<suffix>.json and quality_per_compute<suffix>.json/.png.

    python bench/quality_suite.py --suffix _cuda    # GPU: every stream at once, a few minutes
    python bench/quality_suite.py                   # CPU: one stream at a time, hours on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# stream -> (layouts converted and scored at step 0, inits, uptraining arms)
STREAMS: dict[str, tuple[str, str, str]] = {
    "fusedkv": ("fusedkv", "copy,calibrated,reconstruct", "fusedkv-copy,fusedkv-calibrated,fusedkv-reconstruct"),
    "kd": ("fusedkv", "copy,reconstruct", "fusedkv-copy-kd,fusedkv-reconstruct-kd"),
    "fusedkv_lite": ("fusedkv_lite", "copy,calibrated,reconstruct", "fusedkv_lite-copy,fusedkv_lite-reconstruct"),
    "skipv1": ("skipv1", "copy,calibrated,reconstruct", "skipv1-copy,skipv1-calibrated,skipv1-reconstruct"),
    "commonkv": ("commonkv", "copy,reconstruct", "commonkv-copy,commonkv-reconstruct"),  # no closed-form fit
    "control": ("", "", "control"),
}


def stream_commands(name: str, work: Path, args: argparse.Namespace) -> list[list[str]]:
    layouts, inits, arms = STREAMS[name]
    commands = []
    if layouts:
        commands.append([sys.executable, "bench/init_quality.py", "--layouts", layouts, "--inits", inits,
                         "--tokens", str(args.tokens), "--workdir", str(work), "--out", str(work / "init_quality.json")])
    commands.append([sys.executable, "bench/quality_per_compute.py", "--arms", arms, "--steps", str(args.steps),
                     "--eval-every", str(args.eval_every), "--workdir", str(work), "--no-plot",
                     "--out", str(work / "quality_per_compute.json")])
    return commands


def run_stream(name: str, args: argparse.Namespace) -> int:
    """Runs one stream's commands in order, its output in <work>/<stream>/log.txt; the first failure stops it."""
    work = Path(args.workdir) / name
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    with open(work / "log.txt", "w") as log:
        for command in stream_commands(name, work, args):
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if code:
                return code
    return 0


def merge(names: list[str], args: argparse.Namespace) -> None:
    """One init_quality and one quality_per_compute file from the streams' own (missing ones skipped)."""
    from bench.machine import machine_info
    from uptrain.metrics import plot_eval_curves

    results, evals = {}, {}
    for name in names:
        for file, into, key in (("init_quality.json", results, "results"), ("quality_per_compute.json", evals, "eval")):
            path = Path(args.workdir) / name / file
            if path.exists():
                into.update(json.loads(path.read_text())[key])
    settings = {**vars(args), "streams": names}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    if results:
        held_out = f"WikiText-2 test, first {args.tokens} tokens, context 512 stride 256"
        (out / f"init_quality{args.suffix}.json").write_text(json.dumps(
            {"benchmark": "init_quality", "machine": machine, "settings": settings, "held_out": held_out,
             "results": results}, indent=2) + "\n")
    if evals:
        path = out / f"quality_per_compute{args.suffix}.json"
        path.write_text(json.dumps({"benchmark": "quality_per_compute", "machine": machine, "settings": settings,
                                    "recipe": "configs/uptrain-demo-cpu.yaml", "eval": evals}, indent=2) + "\n")
        plot_eval_curves(evals, path.with_suffix(".png"), "SmolLM2-135M: held-out ppl vs uptraining tokens")
    for name, ppl in ((k, v["ppl"]) for k, v in results.items()):
        print(f"{name:>26}: step 0 ppl {ppl:,.1f}")
    for arm, points in evals.items():
        print(f"{arm:>26}: " + ", ".join(f"{p['step']}: {p['eval_ppl']:.1f}" for p in points))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default=",".join(STREAMS), help=f"subset of {','.join(STREAMS)}")
    parser.add_argument("--jobs", type=int, help="streams run side by side (default: all of them on a GPU, one on a CPU)")
    parser.add_argument("--suffix", default="", help="result names: init_quality<suffix>.json, ...")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=4096, help="WikiText-2 test tokens scored at step 0")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-suite"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--merge-only", action="store_true", help="merge what the streams' folders already hold")
    args = parser.parse_args(argv)

    names = args.streams.split(",")
    unknown = sorted(set(names) - set(STREAMS))
    if unknown:
        parser.error(f"unknown streams {unknown}: choose from {','.join(STREAMS)}")
    if args.jobs is None:
        import torch

        args.jobs = len(names) if torch.cuda.is_available() else 1
    failed = []
    if not args.merge_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            codes = dict(zip(names, pool.map(lambda name: run_stream(name, args), names)))
        failed = [name for name, code in codes.items() if code]
        for name in failed:
            print(f"stream {name} failed: see {Path(args.workdir) / name / 'log.txt'}", file=sys.stderr)
    merge(names, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
