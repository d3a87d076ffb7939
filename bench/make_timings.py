"""How long the Makefile's long targets take on this machine: the numbers the docs quote for `make
demo`, `make serve-env` and `make test-serve` (the demo reports each stage's peak memory itself). Each target runs as a
user would run it; the result (appended per target) goes to bench/results/make_timings.json.

    python bench/make_timings.py demo
    python bench/make_timings.py serve-env    # from nothing: remove .venv-serve first
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "bench" / "results" / "make_timings.json"
# what a target leaves on disk, measured after it (a fresh environment's size is part of its cost)
LEAVES = {"serve-env": ".venv-serve"}


def disk_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e9


def timed(target: str, folder: Path = ROOT) -> dict:
    leaves = folder / LEAVES[target] if target in LEAVES else None
    from_nothing = leaves is None or not leaves.exists()
    start = time.monotonic()
    done = subprocess.run(["make", target], cwd=folder)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"make {target} failed (exit {done.returncode}): nothing recorded")
    result = {"wall_s": round(wall, 1), "minutes": int(wall // 60), "seconds": round(wall % 60),
              "from_nothing": from_nothing,
              "finished": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info()}
    if leaves is not None:
        result["disk_gb"] = round(disk_gb(leaves), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", help="make targets, timed one after another")
    parser.add_argument("--directory", type=Path, default=ROOT, help="where the Makefile is (default the project)")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"the JSON file (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args()
    for target in args.targets:
        result = timed(target, args.directory)
        results = json.loads(args.results.read_text()) if args.results.is_file() else {}
        results[target] = {**result, "command": f"python bench/make_timings.py {target}"}
        args.results.write_text(json.dumps(results, indent=1) + "\n")
        print(f"make {target}: {result['minutes']} min {result['seconds']} s")


if __name__ == "__main__":
    main()
