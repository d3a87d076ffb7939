"""The run's metrics: one JSON line per logged step, and a plot of loss and eval perplexity."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from checkpoint_io.run_folder import read_records
from common.outputs import user_os_errors


class MetricsLog:
    """metrics.jsonl: whole lines only, also when the disk fills up (a failed append is undone and
    is one line naming the file)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():  # drop lines past the resumed step: they will be recomputed identically
            kept = [r for r in read_records(path) if r["step"] <= resume_step]
            staged = path.with_name(f".{path.name}.tmp")
            try:
                with user_os_errors(path):
                    staged.write_text("".join(json.dumps(r) + "\n" for r in kept))
                    os.replace(staged, path)
            finally:
                staged.unlink(missing_ok=True)

    def write(self, record: dict) -> None:
        with user_os_errors(self.path):
            _append(self.path, (json.dumps(record) + "\n").encode())

    def records(self) -> list[dict]:
        return read_records(self.path)


def _append(path: Path, data: bytes) -> None:
    """data at the end of path, or (if a write fails) path as it was."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_ppl" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r["tokens"] for r in train], [r["loss"] for r in train])
    left.set(xlabel="tokens", ylabel="train loss", title="training loss")
    right.plot([r["tokens"] for r in evals], [r["eval_ppl"] for r in evals], marker="o")
    right.set(xlabel="tokens", ylabel="eval perplexity", yscale="log", title="held-out perplexity")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_eval_curves(runs: dict[str, list[dict]], path: Path, title: str, reference: str = "control") -> None:
    """Eval perplexity against tokens for several runs on one axis, the reference run (the control
    arm) drawn apart, black and dashed: does each candidate's gap to it close?

    Tokens are on a symmetric-log axis, linear below the first logged step: step 0 (what the
    conversion alone gives) stays on the plot, and the early steps, where most of the recovery
    happens, are not squeezed into the left edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(runs) > 6  # a suite's dozen arms: distinct colours, legend beside the axes
    fig, ax = plt.subplots(figsize=(9, 5) if many else (6, 4))
    palette = plt.get_cmap("tab20").colors if many else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = itertools.cycle(palette)
    for name, records in runs.items():
        evals = [r for r in records if "eval_ppl" in r]
        style = {"color": "black", "linestyle": "--"} if name == reference else {"color": next(colours)}
        ax.plot([r["tokens"] for r in evals], [r["eval_ppl"] for r in evals], marker="o", label=name, **style)
    first = min((r["tokens"] for records in runs.values() for r in records if r.get("tokens")), default=1)
    ax.set_xscale("symlog", linthresh=first)
    ax.set(xlabel="uptraining tokens (log scale from the first step)", ylabel="held-out perplexity", yscale="log",
           title=title)
    ax.legend(**({"loc": "upper left", "bbox_to_anchor": (1.01, 1), "fontsize": "small"} if many else {}))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
