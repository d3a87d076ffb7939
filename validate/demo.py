"""`run.py demo` (`make demo`): the whole pipeline on the embedded SmolLM2-135M, sized for a 2-core CPU.

For each layout: convert (copy init), uptrain briefly on WikiText-2 validation text, and compare
on WikiText-2 test and an out-of-domain text with the source and with a control arm (the source
uptrained with the same recipe, data order and tokens), which is the fair reference: uptraining
on WikiText improves the unconverted model on WikiText too.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from common.console import console
from models import LAYOUTS

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "uptrain-demo-cpu.yaml"
HONEST_NOTE = (
    "A few CPU minutes recover a large part of the damage but are nowhere near parity: the papers "
    "uptrain with 10-15% of the source's pretraining compute (for SmolLM2-135M, hundreds of billions "
    "of tokens on GPUs; configs/uptrain-smollm2-fusedkv.yaml). Judge a layout against the control column."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", default="fusedkv", help=f"comma list of {', '.join(LAYOUTS)} or 'all' (default fusedkv)")
    parser.add_argument("--init", default="copy", choices=("copy", "calibrated", "reconstruct"))
    parser.add_argument("--steps", type=int, default=24, help="uptraining steps of 1,024 tokens (default 24)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens per text (default 2048)")
    parser.add_argument("--out", default="runs/demo", help="folder for checkpoints, runs and reports")
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")


def convert_step(layout: str, init: str, out: Path, force: bool) -> Path:
    from convert import cli as convert_cli

    target = out / "checkpoints" / f"{layout}-{init}"
    if force or not (target / "config.json").exists():
        convert_cli.convert({**convert_cli.DEFAULTS, "layout": layout, "init": init, "out": str(target), "force": True})
    return target


def uptrain_step(model: Path | None, run: Path, steps: int, control: bool, force: bool) -> Path:
    from uptrain import cli as uptrain_cli

    run_dir = run.with_name(run.name + "-control") if control else run
    if (run_dir / "final" / "config.json").exists() and not force:
        return run_dir / "final"
    overrides = [f"out={run}", f"budget={{steps: {steps}}}", f"eval_every={max(1, steps // 3)}",
                 f"save_every={max(1, steps // 3)}", f"model={model}" if model else "model=null"]
    resume = (run_dir / "checkpoints" / "latest").exists() and not force
    if force and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    uptrain_cli.main(argparse.Namespace(config=str(DEMO_RECIPE), set=overrides, resume=resume, control=control,
                                        resume_from=None, prepare_only=False))
    return run_dir / "final"


def step0_perplexities(checkpoint: Path, token_sets, args) -> list[float]:
    from common.sources import load_causal_lm

    from .perplexity import score_windows

    model = load_causal_lm(checkpoint, attn_implementation="sdpa")
    return [score_windows(model, ids, 512, 256, f"step-0 ppl {name}").perplexity for name, ids in token_sets]


def validate_args(argv: list) -> argparse.Namespace:
    """validate's own parser, so every flag not given here keeps validate's default."""
    from . import cli as validate_cli

    parser = argparse.ArgumentParser()
    validate_cli.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def main(args: argparse.Namespace) -> int:
    from . import cli as validate_cli

    layouts = list(LAYOUTS) if args.layouts == "all" else [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        from common.errors import UserError

        raise UserError(f"unknown layout {unknown[0]!r}; choose from {', '.join(LAYOUTS)} or 'all'")
    out = Path(args.out)
    console.rule("control arm: the unconverted source, same recipe")
    control = uptrain_step(None, out / "runs" / "source", args.steps, control=True, force=args.force)
    rows = []
    for layout in layouts:
        console.rule(f"{layout}: convert ({args.init} init)")
        converted = convert_step(layout, args.init, out, args.force)
        console.rule(f"{layout}: uptrain {args.steps} steps")
        trained = uptrain_step(converted, out / "runs" / f"{layout}-{args.init}", args.steps, False, args.force)
        console.rule(f"{layout}: validate")
        report_dir = out / "reports" / f"{layout}-{args.init}"
        val_args = validate_args(["--candidate", trained, "--control", control, "--max-tokens", args.max_tokens,
                                  "--decode-lengths", 128, "--decode-new-tokens", 8, "--out", report_dir])
        exit_code = validate_cli.main(val_args)
        report = json.loads((report_dir / "report.json").read_text())
        token_sets = validate_cli.tokenized_texts(validate_cli.held_out_texts(val_args), val_args)
        report["step0_perplexity"] = dict(zip([t["name"] for t in report["texts"]],
                                              step0_perplexities(converted, token_sets, val_args)))
        (report_dir / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
        rows.append((layout, report, exit_code, report_dir))
    print_summary(rows, args)
    plot_quality_per_compute(out, layouts, args)
    return 0


def plot_quality_per_compute(out: Path, layouts: list[str], args) -> None:
    """Candidate and control eval perplexity at the same token counts: does the gap close?"""
    from uptrain.metrics import plot_eval_curves, read_records

    runs = {"control (source)": out / "runs" / "source-control"}
    runs.update({layout: out / "runs" / f"{layout}-{args.init}" for layout in layouts})
    curves = {name: read_records(run / "metrics.jsonl") for name, run in runs.items()}
    path = out / "quality_per_compute.png"
    plot_eval_curves(curves, path, "held-out perplexity (WikiText-2 validation tail) vs tokens")
    console.print(f"quality per compute: {path}")


def print_summary(rows, args) -> None:
    table = Table(title=f"where each layout stands (SmolLM2-135M, {args.steps} uptraining steps of 1,024 tokens)")
    for col in ("layout", "KV bytes/token", "text", "source", f"control ({args.steps} st.)", "step 0",
                f"after {args.steps} st.", "vs control"):
        table.add_column(col, justify="right")
    for layout, report, exit_code, report_dir in rows:
        models = report["models"]
        kv_src, kv_cand = models["source"]["kv_bytes_per_token_measured"], models["candidate"]["kv_bytes_per_token_measured"]
        for i, text in enumerate(report["texts"]):
            ppl = text["perplexity"]
            table.add_row(layout if i == 0 else "", f"{kv_cand:,.0f} (-{100 * (1 - kv_cand / kv_src):.0f}%)" if i == 0 else "",
                          text["name"], f"{ppl['source']:.1f}", f"{ppl['control']:.1f}",
                          f"{report['step0_perplexity'][text['name']]:,.0f}", f"{ppl['candidate']:.1f}",
                          f"x{text['comparison']['ratio']:.2f}")
    console.print(table)
    for layout, _, exit_code, report_dir in rows:
        console.print(f"{layout}: {'at parity' if exit_code == 0 else 'not at parity'} with the control; "
                      f"report {report_dir / 'report.md'}")
    console.print(HONEST_NOTE)
