"""The protocol every optional check of validate follows (lm-eval tasks, passkey retrieval, the
behaviour check; validate/checks.py lists them).

``prepare`` builds the check when its options ask for it, with the source's tokenizer, before any
model loads (its mistakes are one line then); ``evaluate`` computes on each model (loaded one at a
time, the source first); ``section`` sums the models up in the report's entry under ``name``, and
``vote`` says whether the candidate passes it, when the options ask for a judgement. ``rows``,
``markdown_lines`` and ``write_files`` render the entry, from report.json alone. A new check is one
module with one such class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .options import ValidateOptions


@dataclass(frozen=True)
class Vote:
    """A check's say in the verdict."""
    passed: bool
    summary: str  # joined to the verdict's summary
    rule: str  # appended to the verdict's rule, a sentence


class Check:
    name: ClassVar[str]  # its key in each model's results and in the report

    @classmethod
    def prepare(cls, opts: ValidateOptions, tokenizer, paths: dict[str, Path]) -> Check | None:
        raise NotImplementedError

    def evaluate(self, model, role: str) -> dict:
        raise NotImplementedError

    @staticmethod
    def section(results: dict[str, dict], reference: str, opts: ValidateOptions) -> Any:
        raise NotImplementedError

    @staticmethod
    def vote(section: Any, reference: str, opts: ValidateOptions) -> Vote | None:
        return None  # reported, not judged

    @staticmethod
    def rows(report: dict) -> list[tuple[str, list[str]]]:
        """Rows of the model table (label, one cell per model)."""
        return []

    @staticmethod
    def markdown_lines(report: dict) -> list[str]:
        return []

    @staticmethod
    def write_files(section: Any, folder: Path) -> None:
        """Files beside report.json (the folder exists)."""
