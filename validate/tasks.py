"""Downstream tasks through lm-evaluation-harness: every model on the same examples, paired differences.

`--tasks hellaswag,arc_easy` names lm-eval tasks (or groups); `--tasks-path DIR` adds a folder of
task YAMLs (lm-eval's ``include_path``). The tasks and their data are loaded once, before any model
(unknown names and unreachable data are one line, exit 2), then each loaded model is wrapped in
lm-eval's ``HFLM`` and scored with ``simple_evaluate`` on the very same task objects. Differences are
paired per example (same docs for every model), so their standard error is that of the per-example
difference, smaller than the two models' errors combined.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np

from common.console import console
from common.data import hub_reachable
from common.errors import UserError

from . import check

if TYPE_CHECKING:
    from .options import ValidateOptions

# Means over examples of a 0/1 (or [0, 1]) score: the metrics a drop in points means something for.
ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")
LM_EVAL_PIN = "lm-eval==0.4.13"


@dataclass
class TaskSet:
    names: list[str]
    loaded: list  # lm-eval Task / Group objects, built once and handed to every model's evaluation
    limit: int | None
    batch_size: int



def task_names(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError(f"--tasks {spec!r} names no task; give lm-eval task names separated by commas")
    return names


def check_args(args: ValidateOptions) -> None:
    """The --tasks flags alone (cheap: no task index, no data, no model)."""
    if args.tasks is None:
        used = [flag for flag, given in (("--tasks-path", args.tasks_path is not None),
                                         ("--tasks-limit", args.tasks_limit != 0),
                                         ("--max-accuracy-drop", args.max_accuracy_drop is not None)) if given]
        if used:
            raise UserError(f"{used[0]} needs --tasks")
        return
    task_names(args.tasks)  # the numbers' ranges are declared in options.py
    if args.tasks_path and not Path(args.tasks_path).is_dir():
        raise UserError(f"--tasks-path {args.tasks_path} is not a folder of task YAMLs")
    _lm_eval()


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"--tasks needs lm-evaluation-harness: run `.venv/bin/pip install {LM_EVAL_PIN}` "
                        "(or `make venv`)") from None
    for name in ("lm_eval", "lm-eval"):  # its per-request INFO lines would bury our own progress
        logging.getLogger(name).setLevel(logging.ERROR)
    return lm_eval


def load_tasks(args: ValidateOptions) -> TaskSet | None:
    """Every named task with its data, or one line saying which name is unknown or whose data is out of reach."""
    if args.tasks is None:
        return None
    from lm_eval.tasks import TaskManager

    names = task_names(args.tasks)
    manager = None
    if args.tasks_path:  # indexing lm-eval's own ~15,000 tasks takes 20 s: skip it when the folder has them all
        manager = TaskManager(include_path=args.tasks_path, include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=args.tasks_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = "lm-eval's tasks" + (f" or {args.tasks_path}" if args.tasks_path else "")
        raise UserError(f"unknown task {unknown[0]!r}: not in {where} (`lm-eval ls tasks` lists them)")
    online = hub_reachable()
    loaded = []
    with contextlib.nullcontext() if online else _offline():
        for name in names:
            console.print(f"task {name}: loading its data" + ("" if online else " (hub unreachable: local cache only)"),
                          highlight=False)
            try:
                built = manager.load([name])
            except (OSError, ValueError) as err:  # a dataset missing from the cache, a bad data file
                reason = " ".join(str(err).split()) or type(err).__name__
                where = ("the Hugging Face Hub or" if online else
                         "the Hugging Face Hub, which cannot be reached from here (no network?), or")
                raise UserError(f"task {name}: its data cannot be read ({reason}); it needs {where} "
                                "a copy in the local datasets cache") from None
            loaded += [*built["tasks"].values()] if not built["groups"] else [*built["groups"].values()]
    return TaskSet(names, loaded, args.tasks_limit or None, args.tasks_batch_size)


@contextlib.contextmanager
def _offline():
    """datasets and huggingface_hub in offline mode for the block: the local cache answers at once, where
    asking an unreachable hub takes 30 s of retries per dataset."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def evaluate(model, tokenizer, task_set: TaskSet) -> dict:
    """{task: {metric: {"value", "stderr", "docs": per-example scores in doc order}}} for the loaded model."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=task_set.batch_size)
    # bootstrap_iters=0: no resampling for other metrics; the stderr of a mean is computed here from the examples
    out = lm_eval.simple_evaluate(lm, tasks=task_set.loaded, limit=task_set.limit, log_samples=True, bootstrap_iters=0)
    scores = {}
    for task, samples in out["samples"].items():
        samples = sorted(samples, key=lambda s: s["doc_id"])
        metrics = out["results"][task]
        scores[task] = {}
        for metric in ACCURACY_METRICS:
            for key in (k for k in metrics if k.split(",")[0] == metric):  # "acc,none": metric, filter
                s_filter = key.split(",")[1]
                docs = [float(s[metric]) for s in samples if s["filter"] == s_filter]
                name = metric if s_filter == "none" else f"{metric} ({s_filter})"
                scores[task][name] = {"value": float(metrics[key]), "stderr": _stderr(docs), "docs": docs}
    return scores


def _stderr(values: list[float]) -> float | None:
    """Standard error of a mean (lm-eval's own formula, sample stddev / sqrt(n)); None from one value."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def paired_difference(candidate: list[float], reference: list[float]) -> tuple[float, float | None]:
    """Mean per-example difference and its standard error (None from a single example)."""
    diff = (np.asarray(candidate) - np.asarray(reference)).tolist()
    return float(np.mean(diff)), _stderr(diff)


def compare(scores: dict[str, dict], reference: str, max_drop: float | None) -> list[dict]:
    """One entry per task and accuracy metric: each model's accuracy and stderr, candidate - reference
    (and - source when the reference is the control) with paired stderrs, and pass when a drop is judged."""
    entries = []
    candidate = scores["candidate"]
    for task, metrics in candidate.items():
        for metric, cand in metrics.items():
            entry = {"task": task, "metric": metric, "examples": len(cand["docs"]),
                     "accuracy": {role: s[task][metric]["value"] for role, s in scores.items()},
                     "stderr": {role: s[task][metric]["stderr"] for role, s in scores.items()}}
            diff, se = paired_difference(cand["docs"], scores[reference][task][metric]["docs"])
            entry["difference"] = {"reference": reference, "value": diff, "stderr": se}
            if reference == "control":
                diff, se = paired_difference(cand["docs"], scores["source"][task][metric]["docs"])
                entry["difference_vs_source"] = {"value": diff, "stderr": se}
            entry["pass"] = None if max_drop is None else -entry["difference"]["value"] <= max_drop + 1e-12
            entries.append(entry)
    return entries


def markdown_lines(report: dict) -> list[str]:
    """The tasks table: accuracy per model, candidate - reference with its paired stderr."""
    entries = report.get("tasks")
    if not entries:
        return []
    roles = list(report["models"])
    reference = entries[0]["difference"]["reference"]
    max_drop = report["settings"].get("max_accuracy_drop")
    lines = ["## Downstream tasks (lm-evaluation-harness)", "",
             "Accuracy ± stderr per model; the difference is paired per example (every model answered the same "
             "examples)." + (f" PASS when the candidate is at most {100 * max_drop:g} points below the {reference}."
                             if max_drop is not None else " Not part of the verdict (no --max-accuracy-drop)."), "",
             "| task | metric | examples | " + " | ".join(roles) + f" | candidate - {reference} | |",
             "|---|---|---:|" + "---:|" * len(roles) + "---:|---|"]
    for e in entries:
        cells = [f"{e['accuracy'][r]:.4f} ± {_se(e['stderr'][r])}" for r in roles]
        d = e["difference"]
        verdict = "" if e["pass"] is None else ("PASS" if e["pass"] else "FAIL")
        lines.append(f"| {e['task']} | {e['metric']} | {e['examples']} | " + " | ".join(cells)
                     + f" | {100 * d['value']:+.2f} ± {_se(d['stderr'], 100)} pts | {verdict} |")
    return lines + [""]


def _se(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{scale * value:.{2 if scale > 1 else 4}f}"


class Tasks(check.Check):
    """lm-eval tasks as a check of validate: every model on the same loaded tasks, with the source's tokenizer."""
    name = "tasks"

    def __init__(self, task_set: TaskSet, tokenizer):
        self.task_set, self.tokenizer = task_set, tokenizer

    @classmethod
    def prepare(cls, opts: ValidateOptions, tokenizer, paths: dict[str, Path]) -> Tasks | None:
        task_set = load_tasks(opts)
        return None if task_set is None else cls(task_set, tokenizer)

    def evaluate(self, model, role: str) -> dict:
        return evaluate(model, self.tokenizer, self.task_set)

    @staticmethod
    def section(results: dict[str, dict], reference: str, opts: ValidateOptions) -> list[dict]:
        return compare(results, reference, opts.max_accuracy_drop)

    @staticmethod
    def vote(section: list[dict], reference: str, opts: ValidateOptions) -> check.Vote | None:
        """Judged with --max-accuracy-drop only: a fail when a task dropped further."""
        if opts.max_accuracy_drop is None:
            return None
        failed = [f"{e['task']} {e['metric']} {100 * e['difference']['value']:+.1f} pts" for e in section
                  if e["pass"] is False]
        return check.Vote(not failed, "tasks: " + (", ".join(failed) if failed else "within the accuracy drop"),
                          f"And on every task, candidate accuracy >= {reference} accuracy - {opts.max_accuracy_drop:g} "
                          "(point estimate, same examples).")

    markdown_lines = staticmethod(markdown_lines)
