"""The validation report: a rich table on the console, report.json and report.md."""
from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from common.console import console


def _fmt_bytes(n: float) -> str:
    return f"{n:,.0f}"


def render_console(report: dict) -> None:
    roles = list(report["models"])
    table = Table(title=f"validate: {report['verdict']['rule']}")
    table.add_column("")
    for role in roles:
        table.add_column(role, justify="right")
    for text in report["texts"]:
        table.add_row(f"ppl {text['name']}", *[f"{text['perplexity'][r]:.3f}" for r in roles])
    for key, label in (("kv_bytes_per_token_measured", "KV bytes/token (measured)"),
                       ("kv_bytes_per_token_arithmetic", "KV bytes/token (arithmetic)"),
                       ("parameters", "parameters")):
        table.add_row(label, *[_fmt_bytes(report["models"][r][key]) for r in roles])
    for i, length in enumerate(report["decode_lengths"]):
        table.add_row(f"decode tok/s @{length}", *[f"{report['models'][r]['decode'][i]['decode_tokens_per_s']:.1f}" for r in roles])
    console.print(table)
    for text in report["texts"]:
        c = text["comparison"]
        console.print(f"{text['name']}: candidate/{report['verdict']['reference']} ppl ratio {c['ratio']:.4f} "
                      f"(95% CI {c['ci_low']:.4f}-{c['ci_high']:.4f}) -> {'PASS' if c['pass'] else 'FAIL'}")
    colour = "green" if report["verdict"]["pass"] else "red"
    console.print(f"[bold {colour}]{'PASS' if report['verdict']['pass'] else 'FAIL'}[/]: {report['verdict']['summary']}")


def render_markdown(report: dict) -> str:
    roles = list(report["models"])
    lines = ["# Validation report", "", f"Verdict: **{'PASS' if report['verdict']['pass'] else 'FAIL'}** "
             f"({report['verdict']['summary']})", "", f"Rule: {report['verdict']['rule']}", "",
             "| | " + " | ".join(roles) + " |", "|---|" + "---:|" * len(roles)]
    for text in report["texts"]:
        lines.append(f"| ppl {text['name']} | " + " | ".join(f"{text['perplexity'][r]:.3f}" for r in roles) + " |")
    for key, label in (("kv_bytes_per_token_measured", "KV bytes/token measured"),
                       ("kv_bytes_per_token_arithmetic", "KV bytes/token arithmetic"), ("parameters", "parameters")):
        lines.append(f"| {label} | " + " | ".join(_fmt_bytes(report["models"][r][key]) for r in roles) + " |")
    for i, length in enumerate(report["decode_lengths"]):
        lines.append(f"| decode tok/s @{length} | " + " | ".join(
            f"{report['models'][r]['decode'][i]['decode_tokens_per_s']:.1f}" for r in roles) + " |")
    lines += ["", "| text | tokens | ratio | 95% CI | verdict |", "|---|---:|---:|---|---|"]
    for text in report["texts"]:
        c = text["comparison"]
        lines.append(f"| {text['name']} | {text['tokens']} | {c['ratio']:.4f} | {c['ci_low']:.4f}-{c['ci_high']:.4f} | "
                     f"{'pass' if c['pass'] else 'fail'} |")
    lines += ["", "Models:", ""] + [f"- {r}: `{report['models'][r]['path']}`" for r in roles]
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: Path) -> None:
    """report.json and report.md, each written to a temporary file first and renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", render_markdown(report))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, folder / name)
