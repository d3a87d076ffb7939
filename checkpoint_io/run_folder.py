"""An uptraining run's folder, by name: what uptrain writes and every later reader (validate's user,
the demo, the benchmarks) finds there.

    recipe.yaml      the recipe the run started with (never rewritten by a resume)
    run.json         world size and each data source's fingerprint, token count and hash
    metrics.jsonl    one JSON record per logged step (step 0: the conversion alone); metrics.png, its plot
    checkpoints/     DeepSpeed's resumable state: stepN/ folders and `latest`
    exports/stepN/   mid-run exports (recipe key export_at), Hugging Face folders
    final/           the trained model, a Hugging Face folder; export.json, how long its export took
    .lock            held by the one process writing the run

A control arm (the source uptrained with the same recipe) lives beside its candidate's run, named
with ``-control``.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from common.errors import UserError


def control_folder(out: Path) -> Path:
    """The control arm's run folder beside the candidate's: the same recipe with its out, plus -control."""
    return out.with_name(out.name + "-control")


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.recipe_file = self.path / "recipe.yaml"
        self.run_file = self.path / "run.json"
        self.metrics = self.path / "metrics.jsonl"
        self.plot = self.path / "metrics.png"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.export_record = self.path / "export.json"
        self.lock = self.path / ".lock"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def export(self, step: int) -> Path:
        """Where export_at's export after step goes."""
        return self.path / "exports" / f"step{step}"

    def control(self) -> RunFolder:
        return RunFolder(control_folder(self.path))

    @property
    def finished(self) -> bool:
        """The run exported its final model."""
        return (self.final / "config.json").is_file()

    @property
    def has_checkpoint(self) -> bool:
        return (self.checkpoints / "latest").is_file()

    def recipe(self) -> dict | None:
        """recipe.yaml as the run's start wrote it; None before a run started here."""
        if not self.recipe_file.is_file():
            return None
        try:
            return yaml.safe_load(self.recipe_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"{self.recipe_file} is damaged; start a new run with another out") from err

    def run_record(self) -> dict:
        """run.json ({} when the run started before it was written)."""
        try:
            return json.loads(self.run_file.read_text()) if self.run_file.is_file() else {}
        except (OSError, ValueError) as err:
            raise UserError(f"{self.run_file} is damaged; start a new run with another out") from err

    def records(self) -> list[dict]:
        return read_records(self.metrics)

    def export_seconds(self) -> float:
        """How long the final export took (export.json)."""
        return json.loads(self.export_record.read_text())["seconds"]


def read_records(path: Path) -> list[dict]:
    """The logged records; a half-written last line (a kill during a write) is left out."""
    lines = [line for line in path.read_text().splitlines() if line] if path.exists() else []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}:{number} is not a JSON record; the metrics log is damaged") from None
    return records
