"""One GPU check in one call of the GPU machine (issue 31), run by bench/device_check.sh.

Everything the GPU machine has to show, in the order that gets the most out of one call: each step
runs in processes of its own under its own time limit (and never past the run's deadline), and the
JSON summary is rewritten after every step, so a step that fails, hangs or is cut short still
leaves every other step's result. Checkpoints are measured and deleted as soon as the check no
longer needs them: at most one exists at any time.

GPU plan (limit / expected seconds; DRY=1 runs the same steps on a CPU at tiny shapes):

    machine    GPU, driver, versions, git commit, free disk                                     30 /  10
    mfu        uptrain's training path (bench/uptrain_throughput.py) at SmolLM2-1.7B's shape,
               control and FusedKV: ZeRO-2, bf16, 4 x 2048 tokens, 10 timed steps, fast path   150 /  80
    model      4 MB of installed Python sources, a 32k BPE tokenizer, a random Llama of
               SmolLM2-1.7B's shape (bf16, 1.74B parameters)                                     60 /  30
    convert    -> FusedKV (copy init, 1.64B); the source is deleted                             45 /  15
    zero3      6 steps at ZeRO-3 under the deepspeed launcher: evals at steps 0 and 6, the
               step-6 checkpoint (measured, deleted), the export                                150 /  90
    reload     the export reloaded: perplexity on the run's eval sequences vs the logged one   45 /  20
    resume     the zero3 run again, killed -9 once its step-3 checkpoint is saved (measured),
               --resume under the launcher (the step-3 checkpoint deleted once loaded) to step
               6: its losses against the uninterrupted run's                                   180 / 110
    mfu_plain  the mfu step with --kernels plain, if at least 60 s are left                     120 /  60

    python bench/device_check.py --out OUT --deadline EPOCH [--dry]      # as device_check.sh calls it
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.e2e_uptrain import SHAPES, bounded, uptrain
from checkpoint_io import RunFolder

ROOT = Path(__file__).resolve().parent.parent

RESERVE = 8  # seconds kept back at the end for the last summary
MIN_STEP = 20  # a step is not started with less time than this left
MARKER = ".device-check"  # in the scratch folder: the check deletes only a folder it made


@dataclass(frozen=True)
class Plan:
    device: str
    shape: str  # of the model trained end to end (bench/e2e_uptrain.py SHAPES)
    dtype: str  # of its weights on disk, hence of the export
    vocab: int
    corpus_mb: int
    seq_len: int
    micro_batch: int
    steps: int  # the kill comes at the checkpoint of steps // 2
    mfu: list[str]  # bench/uptrain_throughput.py arguments
    limits: dict[str, int] = field(default_factory=dict)
    same_loss: float = 1e-6  # the largest loss difference after the resume still called the same, at least


GPU = Plan("cuda", "smollm2-1.7b", "bfloat16", 32000, 4, 1024, 4, 6,
           ["--shape", "smollm2-1.7b", "--micro-batch", "4", "--seq-len", "2048", "--steps", "10"],
           dict(machine=30, mfu=150, model=60, convert=45, zero3=150, reload=45, resume=180, mfu_plain=120),
           same_loss=5e-3)
DRY = Plan("cpu", "tiny", "float32", 1000, 1, 64, 2, 4,
           ["--shape", "tiny", "--micro-batch", "2", "--seq-len", "64", "--steps", "2"],
           dict.fromkeys(("machine", "mfu", "model", "convert", "zero3", "reload", "resume"), 600))  # a shared CPU
LAYOUTS = "source,fusedkv"  # the control and the layout the check trains


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class StepFailed(RuntimeError):
    """A step's own check failed (its processes ran)."""


class Check:
    """The steps of one check, the time left, and the summary written after each step."""

    def __init__(self, plan: Plan, out: Path, work: Path, deadline: float, only: tuple[str, ...] = ()):
        self.plan, self.out, self.work, self.deadline, self.only = plan, out, work, deadline, only
        self.log_path = out / "device_check.log"
        self.summary_path = out / f"device_check_{plan.device}.json"
        self.summary = {"check": "bench/device_check.py", "plan": asdict(plan), "steps": {}, "checkpoints": [],
                        "most_checkpoints_at_once": 0, "git_commit": os.environ.get("BENCH_GIT_COMMIT", "unknown")}

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        tmp.replace(self.summary_path)

    def step(self, name: str, fn, needs: tuple[str, ...] = (), min_left: float = MIN_STEP):
        """Run fn(limit) as step name; its status, seconds and result go into the summary."""
        record = self.summary["steps"][name] = {"status": "skipped"}
        limit = min(self.plan.limits[name], self.left() - RESERVE)
        missing = [n for n in needs if self.summary["steps"].get(n, {}).get("status") != "ok"]
        if (self.only and name not in self.only) or missing or limit < min_left:
            record["why"] = "not asked for (STEPS)" if self.only and name not in self.only else \
                f"needs {', '.join(missing)}" if missing else f"{self.left():.0f} s left"
            self.save()
            return None
        tic, cpu = time.time(), children_cpu_seconds()
        with self.log_path.open("a") as log:
            log.write(f"\n===== {name} (limit {limit:.0f} s, {self.left():.0f} s left) =====\n")
        try:
            result = fn(limit)
            record.update(status="ok")
        except Exception as err:  # whatever a step raises, the others still run and the summary is written
            result = None
            record.update(status="timeout" if "outlasted" in str(err) else "failed",
                          error=f"{type(err).__name__}: {str(err)[-2000:]}")
        record["seconds"] = round(time.time() - tic, 1)
        record["cpu_seconds"] = round(children_cpu_seconds() - cpu, 1)  # of its processes: wall time on a shared CPU
        record["limit_s"] = round(limit)
        self.save()
        return result

    def command(self, argv: list[str], limit: float, until=None, env: dict | None = None) -> None:
        """A python process of this project's, bounded by limit, output to the log; a non-zero exit fails the step."""
        with self.log_path.open("a") as log:
            code = bounded([sys.executable, *map(str, argv)], limit, log, {**os.environ, **(env or {})}, until)
        if code not in (0, None):
            raise StepFailed(f"{' '.join(map(str, argv))} exited with code {code} (see device_check.log)")

    def uptrain(self, recipe: Path, limit: float, extra: tuple[str, ...] = (), **kwargs) -> float:
        with self.log_path.open("a") as log:
            return uptrain(["--config", str(recipe), *extra], self.plan.device, timeout=limit, log=log, launched=True,
                           **kwargs)

    def appears(self, text: str):
        """A function that is True once text has been written to the log after this call."""
        position, tail, wanted = self.log_path.stat().st_size, b"", text.encode()

        def seen() -> bool:
            nonlocal position, tail
            with self.log_path.open("rb") as log:
                log.seek(position)
                new = log.read()
            position += len(new)
            tail = (tail + new)[-(len(wanted) + len(new)):]
            return wanted in tail
        return seen

    def count_checkpoints(self) -> None:
        """How many checkpoints the work folder holds now (the summary keeps the most seen at once)."""
        present = sum(1 for _ in self.work.glob("*/checkpoints/step*"))
        self.summary["most_checkpoints_at_once"] = max(self.summary["most_checkpoints_at_once"], present)

    def checkpoints(self, run: str, delete: bool) -> None:
        """Record the bytes of each checkpoint run holds (and how many exist in the work folder); delete them if asked."""
        folder = RunFolder(self.work / run).checkpoints
        tags = sorted(p for p in folder.glob("step*") if p.is_dir()) if folder.is_dir() else []
        self.count_checkpoints()
        for tag in tags:
            self.summary["checkpoints"].append({"run": run, "tag": tag.name, "bytes": folder_bytes(tag),
                                                "disk_free_bytes": shutil.disk_usage(self.work).free})
        if delete:
            shutil.rmtree(folder, ignore_errors=True)

    def recipe(self, name: str, save_every: int) -> Path:
        """The recipe of the zero3 and resume runs: uptrain's GPU fast path unless the mfu step saw it fail."""
        import yaml

        mfu = self.summary["steps"].get("mfu", {}).get("status")
        kernels = "plain" if mfu != "ok" and mfu != "skipped" else "auto"
        self.summary.setdefault("kernels_of_the_runs", kernels)
        p, path = self.plan, self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"kernels": kernels,
            "model": str(self.work / "fusedkv"), "data": str(self.work / "corpus.jsonl"),
            "token_cache": str(self.work / "tokens"), "out": str(self.work / name), "seq_len": p.seq_len,
            "micro_batch": p.micro_batch, "budget": {"steps": p.steps}, "lr": 1e-3, "warmup_steps": 1,
            "eval_every": p.steps, "eval_tokens": 4 * p.seq_len, "save_every": save_every, "keep_last": 1,
            "zero_stage": 3, "activation_checkpointing": False}))
        return path


def run_check(plan: Plan, out: Path, work: Path, deadline: float, install: dict, only: tuple[str, ...] = ()) -> int:
    if work.is_dir() and any(work.iterdir()) and not (work / MARKER).exists():
        print(f"error: {work} holds files the check did not write; set WORK to a new folder", file=sys.stderr)
        return 2
    check = Check(plan, out, work, deadline, only)
    check.summary["install"] = install
    shutil.rmtree(work, ignore_errors=True)  # what an earlier check left (a run cut short)
    work.mkdir(parents=True)
    (work / MARKER).touch()
    me = Path(__file__)

    def machine(limit):
        check.command([me, "--machine", out / "machine.json"], limit)
        check.summary["machine"] = json.loads((out / "machine.json").read_text())
        check.summary["git_commit"] = check.summary["machine"]["git_commit"]
        (out / "machine.json").unlink()

    def mfu(kernels: str):
        def measure(limit):  # a layout that fails is recorded; the others' numbers are kept
            key, suffix = ("mfu", "") if kernels == "auto" else ("mfu_plain", "_plain")
            result = out / f"uptrain_{plan.shape}_{plan.device}{suffix}.json"
            try:
                check.command([ROOT / "bench/uptrain_throughput.py", "--device", plan.device, "--layouts", LAYOUTS,
                               "--kernels", kernels, "--out", result, *plan.mfu], limit)
            finally:
                runs = json.loads(result.read_text())["results"] if result.is_file() else {}
                check.summary[key] = {layout: {k: r.get(k) for k in ("tokens_per_s", "mfu", "tokens_per_s_vs_source",
                                                                     "kernels", "peak_memory_bytes", "parameters",
                                                                     "error")} for layout, r in runs.items()}
        return measure

    def model(limit):
        check.command([me, "--make-model", work, "--shape", plan.shape, "--vocab", plan.vocab, "--corpus-mb",
                       plan.corpus_mb, "--device", plan.device, "--dtype", plan.dtype], limit)
        return {"source_bytes": folder_bytes(work / "source")}

    def convert(limit):
        check.command([ROOT / "run.py", "convert", "--source", work / "source", "--layout", "fusedkv", "--out",
                       work / "fusedkv"], limit)
        shutil.rmtree(work / "source")  # uptrain with the lm loss never reads it
        return {"fusedkv_bytes": folder_bytes(work / "fusedkv")}

    def zero3(limit):
        seconds = check.uptrain(check.recipe("zero3", save_every=plan.steps), limit)
        check.checkpoints("zero3", delete=True)
        run = RunFolder(work / "zero3")
        records = run.records()
        return {"seconds": round(seconds, 1), "losses": [r["loss"] for r in records if "loss" in r],
                "eval_ppl": [r["eval_ppl"] for r in records if "eval_ppl" in r],
                "tokens_per_s": [round(r["tokens_per_s"]) for r in records if "tokens_per_s" in r],
                "gpu_peak_gib": max((r["gpu_peak_gib"] for r in records if "gpu_peak_gib" in r), default=None),
                "export_seconds": run.export_seconds(), "export_bytes": folder_bytes(run.final)}

    def reload(limit):
        run = RunFolder(work / "zero3")
        check.command([me, "--reload", run.final, "--recipe", work / "zero3.yaml", "--result", work / "reload.json"],
                      limit)
        logged = run.records()[-1]["eval_ppl"]
        reloaded = json.loads((work / "reload.json").read_text())["eval_ppl"]
        shutil.rmtree(run.final)
        return {"logged_eval_ppl": logged, "reloaded_eval_ppl": reloaded, "relative_difference": abs(reloaded / logged - 1)}

    def resume(limit):
        recipe, half = check.recipe("resume", save_every=plan.steps // 2), plan.steps // 2
        tic = time.time()
        killed_at = RunFolder(work / "resume").checkpoints / f"step{half}"
        check.uptrain(recipe, limit, kill_at=killed_at)
        check.checkpoints("resume", delete=False)  # the killed run's: measured, kept for the resume
        resumed_from_it = check.appears(f"resumed at step {half}")

        def loaded():  # the resumed run has read its checkpoint: deleted before the next one is written
            check.count_checkpoints()
            if resumed_from_it():
                shutil.rmtree(killed_at, ignore_errors=True)

        check.uptrain(recipe, limit - (time.time() - tic), extra=("--resume",), while_running=loaded)
        check.checkpoints("resume", delete=True)
        straight, resumed = (RunFolder(work / run).records() for run in ("zero3", "resume"))
        pairs = [(a["step"], a["loss"], b["loss"]) for a, b in zip(straight, resumed) if "loss" in a and "loss" in b]
        before = max((abs(a - b) for s, a, b in pairs if s <= half), default=0.0)  # the same computation twice
        after = max((abs(a - b) for s, a, b in pairs if s > half), default=None)
        if after is None or [r["step"] for r in resumed] != [r["step"] for r in straight]:
            raise StepFailed(f"the resumed run logged steps {[r['step'] for r in resumed]}, the straight one "
                             f"{[r['step'] for r in straight]}")
        tolerance = max(plan.same_loss, 3 * before)
        return {"killed_at_checkpoint": half, "losses_straight": [a for _, a, _ in pairs],
                "losses_resumed": [b for _, _, b in pairs], "max_loss_difference_before_kill": before,
                "max_loss_difference_after_resume": after, "tolerance": tolerance, "same_loss": after <= tolerance,
                "eval_ppl_straight": straight[-1].get("eval_ppl"), "eval_ppl_resumed": resumed[-1].get("eval_ppl")}

    results = check.summary
    check.step("machine", machine)
    check.step("mfu", mfu("auto"))
    results["model"] = check.step("model", model)
    results["convert"] = check.step("convert", convert, needs=("model",))
    results["zero3_export"] = check.step("zero3", zero3, needs=("convert",))
    results["reload"] = check.step("reload", reload, needs=("zero3",))
    results["kill_resume"] = check.step("resume", resume, needs=("zero3",))
    if plan.device == "cuda":  # on a CPU there is no fast path: plain is what mfu measured
        check.step("mfu_plain", mfu("plain"), min_left=60)
    results["verdict"] = verdict(results, plan)
    check.save()
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["status"] in ("ok", "skipped") for s in results["steps"].values()) else 1


def verdict(results: dict, plan: Plan) -> dict:
    """The issue's targets, each true, false or None (not measured)."""
    mfu = {name: r for name, r in (results.get("mfu") or {}).items() if r.get("tokens_per_s")}
    reload, resume = results.get("reload") or {}, results.get("kill_resume") or {}
    lowest_mfu = min((r["mfu"] for r in mfu.values() if r.get("mfu")), default=None)
    control = mfu.get("source", {}).get("tokens_per_s")
    layouts = [r["tokens_per_s"] for name, r in mfu.items() if name != "source"]
    reload_tolerance = 1e-5 if plan.device == "cpu" else 1e-3
    return {
        "mfu_at_least_0.45": None if lowest_mfu is None else lowest_mfu >= 0.45,
        "every_layout_at_least_the_control": all(t >= control for t in layouts) if control and layouts else None,
        "zero3_export_reloads_to_the_logged_ppl": reload["relative_difference"] <= reload_tolerance if reload else None,
        "kill_resume_same_loss": resume.get("same_loss"),
        "at_most_one_checkpoint": results["most_checkpoints_at_once"] <= 1,
    }


def make_model(work: Path, shape: str, vocab: int, corpus_mb: int, device: str, dtype: str) -> None:
    from bench.e2e_uptrain import corpus, random_model, tokenizer

    corpus(work / "corpus.jsonl", corpus_mb)
    tokenizer(work / "source", work / "corpus.jsonl", vocab)
    random_model(work / "source", SHAPES[shape], vocab, device, dtype)


def reload_ppl(final: Path, recipe_path: Path) -> float:
    """The export's perplexity on the run's eval sequences, computed as the run computed it (its
    eval_ppl and, on a GPU, the same fast-path kernels)."""
    import torch

    from checkpoint_io.dtypes import checkpoint_dtype
    from common.sources import load_causal_lm, load_tokenizer
    from uptrain import fast_path
    from uptrain.data import prepare_data
    from uptrain.engine import use_bf16
    from uptrain.recipe import load_recipe
    from uptrain.train import eval_ppl

    recipe = load_recipe(str(recipe_path))
    dtype = torch.bfloat16 if use_bf16(recipe) else checkpoint_dtype(final)
    model = load_causal_lm(final, dtype=dtype).to("cuda" if torch.cuda.is_available() else "cpu")
    fast_path.enable(model, recipe.kernels, recipe.zero_stage, recipe.loss, dtype)
    data = prepare_data(recipe, load_tokenizer(final))
    return eval_ppl(model, data.eval_sequences, recipe.micro_batch, zero3=False)


def machine() -> dict:
    import importlib.metadata
    import subprocess

    from bench.machine import machine_info

    info = machine_info()
    for name in ("deepspeed", "datasets", "liger-kernel", "triton", "pydantic", "tokenizers", "safetensors"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    info["disk_free_bytes"] = shutil.disk_usage("/tmp").free
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default /tmp/device-check[-dry])")
    parser.add_argument("--deadline", type=float, help="epoch seconds by which the check has ended")
    parser.add_argument("--dry", action="store_true", help="the same steps on a CPU at tiny shapes")
    parser.add_argument("--install", default="not run", help="what device_check.sh's wheel install did")
    parser.add_argument("--install-seconds", type=float, default=0)
    parser.add_argument("--steps", default="", help="only these steps, comma-separated (a rerun of what broke)")
    # internal steps, each run in a process of its own
    parser.add_argument("--machine", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape"), parser.add_argument("--vocab", type=int)
    parser.add_argument("--corpus-mb", type=int), parser.add_argument("--device"), parser.add_argument("--dtype")
    parser.add_argument("--reload", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path), parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    if args.machine:
        args.machine.write_text(json.dumps(machine(), indent=2) + "\n")
    elif args.make_model:
        make_model(args.make_model, args.shape, args.vocab, args.corpus_mb, args.device, args.dtype)
    elif args.reload:
        args.result.write_text(json.dumps({"eval_ppl": reload_ppl(args.reload, args.recipe)}) + "\n")
    else:
        plan = DRY if args.dry else GPU
        args.out.mkdir(parents=True, exist_ok=True)
        work = args.work or Path(f"/tmp/device-check{'-dry' if args.dry else ''}")
        install = {"status": args.install, "seconds": args.install_seconds}
        only = tuple(s for s in args.steps.split(",") if s)
        return run_check(plan, args.out, work, args.deadline or time.time() + 530, install, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
