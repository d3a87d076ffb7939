"""The validation report: a rich table on the console, report.json and report.md (same rows in both)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.table import Table

from common.console import console
from common.outputs import made_folder, user_os_errors

from .checks import CHECKS


def model_rows(report: dict) -> list[tuple[str, list[str]]]:
    """(label, one cell per model) rows: perplexities, behaviour scores, KV bytes, parameters, decode speed."""
    models = report["models"]
    roles = list(models)

    def row(label, cell):
        return label, [cell(role) for role in roles]

    rows = [row(f"ppl {t['name']} ({t['tokens']:,} tok)", lambda r, t=t: f"{t['perplexity'][r]:.3f}")
            for t in report["texts"]]
    rows += [row for check in CHECKS for row in check.rows(report)]
    rows += [
        row("KV bytes/token, measured", lambda r: f"{models[r]['kv_bytes_per_token_measured']:,.0f}"),
        row("KV bytes/token, arithmetic", lambda r: f"{models[r]['kv_bytes_per_token_arithmetic']:,.0f}"),
        row("KV saving vs source", lambda r: f"{100 * models[r]['kv_saving_vs_source']:.1f}%"),
        row("parameters", lambda r: f"{models[r]['parameters']:,}"),
    ]
    rows += [row(f"decode tok/s @{n}", lambda r, i=i: f"{models[r]['decode'][i]['decode_tokens_per_s']:.1f}")
             for i, n in enumerate(report["decode_lengths"])]
    return rows


def comparison_lines(report: dict) -> list[str]:
    """One line per text and comparison: ratio, CI, whether it is a real difference, pass/fail."""
    lines = []
    for text in report["texts"]:
        c, windows = text["comparison"], text["windows"]
        lines.append(f"{text['name']}: candidate/{c['reference']} ppl ratio {_ratio(c, windows)} -> "
                     f"{'PASS' if c['pass'] else 'FAIL'}")
        if "candidate_vs_source" in text:
            lines.append(f"{text['name']}: candidate/source ppl ratio {_ratio(text['candidate_vs_source'], windows)} "
                         "(for information; the verdict uses the control)")
    return lines


def _ratio(c: dict, windows: int) -> str:
    if c["diverged"]:
        return "undefined: a model diverged (perplexity inf)"
    if c["ci_low"] is None:
        return f"{c['ratio']:.4f} (95% CI undefined: {windows} window, it needs 2 or more)"
    real = "real difference" if c["real_difference"] else "not distinguishable from 1"
    return f"{c['ratio']:.4f} (95% CI {c['ci_low']:.4f}-{c['ci_high']:.4f}, {real})"


def check_lines(report: dict) -> list[str]:
    return [line for check in CHECKS for line in check.markdown_lines(report)]


def _verdict_word(report: dict) -> str:
    return "PASS" if report["verdict"]["pass"] else "FAIL"


def render_console(report: dict) -> None:
    table = Table(title="validate")
    table.add_column("")
    for role in report["models"]:
        table.add_column(role, justify="right")
    for label, cells in model_rows(report):
        table.add_row(label, *cells)
    console.print(table)
    for line in comparison_lines(report) + check_lines(report):
        console.print(line, highlight=False)
    colour = "green" if report["verdict"]["pass"] else "red"
    console.print(f"[bold {colour}]{_verdict_word(report)}[/] (exit {report['verdict']['exit_code']}): "
                  f"{report['verdict']['summary']}", highlight=False)
    console.print(report["verdict"]["rule"], highlight=False)


def render_markdown(report: dict) -> str:
    roles = list(report["models"])
    s = report["settings"]
    lines = ["# Validation report", "",
             f"Verdict: **{_verdict_word(report)}** ({report['verdict']['summary']})", "",
             f"Rule: {report['verdict']['rule']}", "",
             f"Perplexity: strided sliding windows of {s['context']} tokens moving by {s['stride']}, only the new "
             "tokens of each window scored; every model scored on the same token ids.", "",
             "| | " + " | ".join(roles) + " |", "|---|" + "---:|" * len(roles)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in model_rows(report)]
    lines += ["", *[f"- {line}" for line in comparison_lines(report)], ""]
    lines += check_lines(report)
    lines += ["Models:", ""]
    lines += [f"- {role}: `{report['models'][role]['path']}`" for role in roles]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: Path) -> None:
    """report.json and report.md, both written to temporary files first and then renamed into place:
    a full disk leaves the previous report or none, never half of one, and no temporary file."""
    contents = {"report.json": json.dumps(_strict_json(report), indent=2, default=str, allow_nan=False) + "\n",
                "report.md": render_markdown(report)}
    staged = {name: folder / f".{name}.tmp" for name in contents}
    with user_os_errors(folder), made_folder(folder):
        try:
            for name, tmp in staged.items():
                tmp.write_text(contents[name], encoding="utf-8")
            for name, tmp in staged.items():
                os.replace(tmp, folder / name)
        finally:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)


def _strict_json(value):
    """value with every inf or NaN (a diverged model's perplexity) as None: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value
