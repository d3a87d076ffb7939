"""`run.py demo` (`make demo`): the whole pipeline on the embedded SmolLM2-135M (or `--source`, a
checkpoint of your own), sized for a 2-core CPU.

For each layout: convert (reconstruct init, at a budget sized for the demo), uptrain briefly on
WikiText-2 validation text, and compare on WikiText-2 test and an out-of-domain text with the
source and with a control arm (the source uptrained with the same recipe, data order and
tokens), which is the fair reference: uptraining on WikiText improves the unconverted model on
WikiText too. Then every model answers the same few prompts, greedily, side by side.

The demo sits above the stages and calls each one as a library (`convert.run`, `uptrain.run`,
`validate.run`), printing the command a user would type for the same options. Each stage runs in a
fresh process: what a stage holds (a DeepSpeed engine, two models, glibc's freed-but-kept heap) goes
back to the system before the next starts, so the demo's peak memory is its largest stage, not their
sum; each stage reports its own peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
from pathlib import Path

from rich.table import Table

import convert
import uptrain
import validate
from checkpoint_io import Conversion, RunFolder
from common.console import console
from common.processes import fresh_processes
from common.errors import UserError
from common.options import command_line, load_options
from models import LAYOUTS
from uptrain.recipe import Recipe, as_written
from validate.samples import PROMPTS

ROOT = Path(__file__).resolve().parent
DEMO_RECIPE = ROOT / "configs" / "uptrain-demo-cpu.yaml"
# The strongest init that fits the demo's minutes: reconstruct on 2,048 calibration tokens x 20 Adam
# steps per layer (FusedKV step-0 perplexity on 2,048 WikiText-2 test tokens: 381, against 24,780
# for copy and 9,757 for calibrated; the defaults, 16,384 x 150, take several times longer).
# CommonKV's rank budget reads the same tokens.
DEMO_FIT = {"calib_tokens": 2048, "reconstruct_steps": 20}
# validate's timed decode steps (after an untimed warm-up run): enough for a steady median; about two
# seconds per model at 128 cached tokens on two cores
DECODE_NEW_TOKENS = 32
HONEST_NOTE = (
    "A few CPU minutes recover a large part of the damage but are nowhere near parity: the papers "
    "uptrain with 10-15% of the source's pretraining compute (for SmolLM2-135M, hundreds of billions "
    "of tokens on GPUs; configs/uptrain-smollm2-fusedkv.yaml). Judge a layout against the control column."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=None,
                        help="checkpoint folder or .gguf to convert (default: the embedded SmolLM2-135M)")
    parser.add_argument("--layouts", default="fusedkv", help=f"comma list of {', '.join(LAYOUTS)} or 'all' (default fusedkv)")
    parser.add_argument("--init", default="reconstruct", choices=convert.options.INITS,
                        help="conversion init (default reconstruct, at the demo's budget: "
                             f"{', '.join(f'{k} {v}' for k, v in DEMO_FIT.items())})")
    parser.add_argument("--steps", type=int, default=8, help="uptraining steps of 1,024 tokens (default 8)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="held-out tokens per text for validate, twice that for uptraining's evals (default 1024)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per answer (default 32)")
    parser.add_argument("--out", default="runs/demo", help="folder for checkpoints, runs and reports")
    parser.add_argument("--force", action="store_true", help="redo steps whose outputs exist")
    parser.add_argument("--mini-share", type=float, default=MINI_SHARE,
                        help="part one: uptraining tokens of the mini source, as a share of its pretraining tokens "
                             f"(default {MINI_SHARE:g}; 0 skips part one; skipped with --source)")
    parser.add_argument("--mini-layout", default=MINI_LAYOUT, choices=LAYOUTS,
                        help=f"part one's layout (default {MINI_LAYOUT}; each with its best init: "
                             f"{', '.join(f'{k} {v}' for k, v in MINI_INITS.items())})")


def staged(stage: str, options, flags, config: str | None = None, keep=(), **kwargs):
    """One stage, printed as the command that does the same, run as a library call in a fresh
    process (`<stage>.run(options)`): the models and buffers it holds leave with it."""
    console.print(f"[bold]$ {command_line(stage, options, flags, config, keep)}[/]", highlight=False, soft_wrap=True)
    result, peak_gb = in_child(measured, STAGES[stage].run, options, kwargs)
    console.print(f"[dim]{stage}: peak memory {peak_gb:.2f} GB[/]")
    PEAKS[stage] = max(PEAKS.get(stage, 0.0), peak_gb)
    return result


STAGES = {"convert": convert, "uptrain": uptrain, "validate": validate}
PEAKS: dict[str, float] = {}  # stage -> its largest peak resident memory so far, GB


def measured(fn, options, kwargs):
    """(In the child.) fn's result and the process's peak resident memory in GB."""
    result = fn(options, **kwargs)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


# Imported once, by the fork server every stage's process is forked from: a stage then starts in
# a fraction of a second instead of importing torch and transformers again. Nothing has run in the
# server (no threads, no tensors), so each fork starts as clean as a spawned process.
PRELOAD = ["torch", "transformers", "models.modeling_sharedkv"]


def in_child(fn, *args):
    """fn(*args) in a fresh process: the models it loads leave with it."""
    with fresh_processes(preload=PRELOAD) as pool:
        return pool.submit(fn, *args).result()


def uptrain_step(model: Path | None, run: Path, args: argparse.Namespace) -> Path:
    """Uptrain model (None: the control arm, the source itself) into run; returns its final folder."""
    from common.sources import default_model_path
    from uptrain.cli import FLAGS

    folder = RunFolder(run).control() if model is None else RunFolder(run)
    config = os.path.relpath(DEMO_RECIPE)  # as the user would type it, from where they stand
    # The control arm trains the source itself: named outright, not through the recipe's conversion
    # (the demo writes its conversions under --out, not where the recipe's model points).
    trained = model if model is not None else (args.source or default_model_path())
    recipe = load_options(Recipe, config, flags={
        "out": str(run), "budget": {"steps": args.steps}, "eval_every": max(1, args.steps // 2),
        "save_every": args.steps, "eval_tokens": 2 * args.max_tokens, "model": str(trained),
        "source": args.source, "control_arm": model is None})
    # Only the last step saves a checkpoint (each would write 1.6 GB of optimizer state, seconds on a
    # few minutes' run): a run killed before it starts again, one killed while exporting resumes.
    resume = resume_or_reset(folder, recipe, args.force)
    if resume is None:
        return folder.final
    return staged("uptrain", recipe, FLAGS, config, resume=resume).final


def resume_or_reset(folder: RunFolder, recipe: Recipe, force: bool) -> bool | None:
    """None when folder holds this recipe's finished run; else whether to resume it (same recipe, a
    checkpoint), the folder emptied when not (another --steps or --source, or --force, starts again)."""
    same = started_with(folder.path, recipe) and not force
    if same and folder.finished:
        return None
    if not (same and folder.has_checkpoint):
        shutil.rmtree(folder.path, ignore_errors=True)
        return False
    return True


def started_with(run_dir: Path, recipe: Recipe) -> bool:
    """Whether the run in run_dir was started with exactly this recipe."""
    try:
        return RunFolder(run_dir).recipe() == as_written(recipe)
    except UserError:  # a damaged recipe.yaml: start again
        return False


def convert_step(layout: str, out: Path, args: argparse.Namespace) -> Path:
    from convert.options import FLAGS

    target = out / "checkpoints" / f"{layout}-{args.init}"
    options = convert.ConvertOptions(source=args.source, layout=layout, init=args.init, out=str(target),
                                     force=True, **DEMO_FIT)
    if args.force or not converted_with(target, options):
        staged("convert", options, FLAGS, keep=("layout", "init"))
    return target


def converted_with(target: Path, options: convert.ConvertOptions) -> bool:
    """Whether target holds a conversion of the same source with the same layout, init and fit budget."""
    from common.sources import resolve_model_path

    try:
        saved = Conversion.find(target)
    except UserError:  # a damaged conversion.json: convert again
        return False
    return (saved is not None and saved.source.resolve() == resolve_model_path(options.source).resolve()
            and all(saved.options.get(k) == getattr(options, k) for k in ("layout", "init", *DEMO_FIT)))


def validate_step(control: Path, trained: Path, report_dir: Path, args: argparse.Namespace):
    from validate.options import FLAGS

    options = validate.ValidateOptions(source=args.source, candidate=str(trained), control=str(control),
                                       max_tokens=args.max_tokens, decode_lengths=(128,), decode_new_tokens=DECODE_NEW_TOKENS,
                                       out=str(report_dir))
    return staged("validate", options, FLAGS)


def behaviour(models: dict[str, Path | None], scored: str, args: argparse.Namespace) -> dict[str, dict]:
    """(In a child process.) Each model's greedy answers (None: the embedded source), and the
    perplexity of model `scored` on the held-out token ids validate scores; one model in memory at a time."""
    from validate.samples import model_behaviour
    from validate.stage import held_out_texts, tokenized_texts

    options = validate.ValidateOptions(source=args.source, candidate="default", max_tokens=args.max_tokens)
    token_sets = tokenized_texts(held_out_texts(options), options)
    return {name: model_behaviour(path, args.new_tokens, token_sets if name == scored else None)
            for name, path in models.items()}


def main(args: argparse.Namespace) -> int:
    if args.source is None and args.mini_share > 0:
        parity_on_a_mini_source(args)
    layouts = list(LAYOUTS) if args.layouts == "all" else [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        raise UserError(f"unknown layout {unknown[0]!r}; choose from {', '.join(LAYOUTS)} or 'all'")
    out = Path(args.out)
    console.rule("control arm: the unconverted source, same recipe")
    control = uptrain_step(None, out / "runs" / "source", args)
    rows, said = [], {}
    source = Path(args.source) if args.source else None
    for layout in layouts:
        console.rule(f"{layout}: convert ({args.init} init)")
        converted = convert_step(layout, out, args)
        console.rule(f"{layout}: uptrain {args.steps} steps")
        trained = uptrain_step(converted, out / "runs" / f"{layout}-{args.init}", args)
        console.rule(f"{layout}: validate against the source and the control")
        result = validate_step(control, trained, out / "reports" / f"{layout}-{args.init}", args)
        console.rule(f"{layout}: greedy answers of the source, the control and {layout} before and after")
        names = model_names(layout, args.steps)
        todo = {name: path for name, path in zip(names, (source, control, converted, trained)) if name not in said}
        said.update(in_child(behaviour, todo, names[2], args))  # source, control: once
        report = dict(result.data, step0_perplexity=said[names[2]]["perplexity"],
                      answers={"prompts": list(PROMPTS), **{name: said[name]["answers"] for name in names}},
                      peak_memory_gb=dict(PEAKS))
        (result.folder / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
        rows.append((layout, report, result.exit_code, result.folder))
    print_summary(rows, args)
    print_answers(said)
    console.print(HONEST_NOTE)
    plot_quality_per_compute(out, layouts, args)
    console.print(f"peak memory per stage (GB): {', '.join(f'{k} {v:.2f}' for k, v in PEAKS.items())}")
    return 0


def model_names(layout: str, steps: int) -> tuple[str, str, str, str]:
    """Source, control, converted at step 0, converted after training: the columns every table shares."""
    return "source", f"control ({steps} steps)", f"{layout} step 0", f"{layout} after {steps} steps"


def print_answers(said: dict[str, dict]) -> None:
    """One row per prompt and model: the source before and after uptraining (the control), each
    converted model before and after."""
    table = Table(title="greedy answers to the chat prompts: before and after uptraining")
    for col in ("prompt", "model", "answer"):
        table.add_column(col)
    for i, prompt in enumerate(PROMPTS):
        for k, (name, result) in enumerate(said.items()):
            table.add_row(prompt if k == 0 else "", name, result["answers"][i], end_section=k == len(said) - 1)
    console.print(table)


def print_summary(rows, args) -> None:
    source = Path(args.source).name if args.source else "SmolLM2-135M"
    table = Table(title=f"where each layout stands ({source}, {args.steps} uptraining steps of 1,024 tokens)")
    for col in ("layout", "KV bytes/token", "text", "source", f"control ({args.steps} st.)", f"step 0 ({args.init})",
                f"after {args.steps} st.", "vs control"):
        table.add_column(col, justify="right")
    for layout, report, _, _ in rows:
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


def plot_quality_per_compute(out: Path, layouts: list[str], args) -> None:
    """Candidate and control eval perplexity from step 0 on, at the same token counts: does the gap close?"""
    from uptrain.metrics import plot_eval_curves

    control = "control (source, same steps)"
    runs = {control: RunFolder(out / "runs" / "source").control()}
    runs.update({f"{layout} ({args.init} init)": RunFolder(out / "runs" / f"{layout}-{args.init}") for layout in layouts})
    curves = {name: run.records() for name, run in runs.items()}
    path = out / "quality_per_compute.png"
    plot_eval_curves(curves, path, "held-out perplexity (WikiText-2 validation tail) vs tokens", reference=control)
    console.print(f"quality per compute: {path}")


# ---------------------------------------------------------------- part one: parity where C is known

MINI_SOURCE = ROOT / "data" / "mini-sources" / "demo"
MINI_RECIPE = ROOT / "configs" / "uptrain-mini.yaml"
# 15% of the source's pretraining tokens, the papers' budget: about two minutes on two cores for the
# candidate and its control side by side (the demo source is 0.56M parameters pretrained on 10 tokens
# each, bench/parity_study.py --shape demo, for this).
MINI_SHARE = 0.15
# each layout with the init that recovers best in the study (docs/parity.md), fitted with the study's
# budget (common/code_corpus.RECONSTRUCT_FIT); CommonKV keeps a quarter of the cache and reaches its
# control here
MINI_INITS = {"fusedkv": "reconstruct", "fusedkv_lite": "copy", "skipv1": "reconstruct", "commonkv": "reconstruct"}
MINI_LAYOUT = "commonkv"
CODE_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef python_files(folder):\n",
                "class Stack:\n    def __init__(self):\n")


def parity_on_a_mini_source(args: argparse.Namespace) -> None:
    """A 0.56M-parameter Llama pretrained here on 5.6M tokens of the installed packages' Python
    (bench/parity_study.py --shape demo): converted to --mini-layout with its best init, uptrained
    with --mini-share of that compute beside its control, judged by validate, then both and the
    source complete code."""
    from common import code_corpus
    from convert.options import FLAGS
    from validate.options import FLAGS as VALIDATE_FLAGS

    console.rule(f"part one: parity on a source pretrained here ({os.path.relpath(MINI_SOURCE, ROOT)})")
    out = Path(args.out) / "mini"
    corpus = out / "corpus"
    if not (corpus / "corpus.json").is_file():
        code_corpus.build(corpus, train_per_mille=30)  # ~8 MB of train code, tokenized in seconds
    layout, init = args.mini_layout, MINI_INITS[args.mini_layout]
    target = out / "checkpoints" / f"{layout}-{init}"
    options = convert.ConvertOptions(source=str(MINI_SOURCE), layout=layout, init=init, out=str(target),
                                     calib_text=str(code_corpus.calib_text(corpus)), force=True,
                                     **(code_corpus.RECONSTRUCT_FIT if init == "reconstruct" else {}))
    if args.force or not converted_with(target, options):
        staged("convert", options, FLAGS, keep=("layout", "init"))
    manifest = json.loads((MINI_SOURCE / "pretraining.json").read_text())
    tokens = round(args.mini_share * manifest["tokens"])
    runs = {name: mini_recipe(model, out / "runs" / name, corpus, tokens)
            for name, model in (("control", MINI_SOURCE), (layout, target))}
    finals = uptrain_in_parallel(runs, args)
    report = staged("validate", validate.ValidateOptions(
        source=str(MINI_SOURCE), candidate=str(finals[layout]), control=str(finals["control"]),
        data=(str(code_corpus.eval_text(corpus)), str(default_wikitext_test())), max_tokens=16384,
        context=manifest["seq_len"], stride=manifest["seq_len"], decode_lengths=(128,), decode_new_tokens=DECODE_NEW_TOKENS,
        out=str(out / "report")), VALIDATE_FLAGS)
    said = in_child(mini_completions, {"source": MINI_SOURCE, **finals}, args.new_tokens)
    print_mini_summary(report, said, layout, args.mini_share, manifest)


def mini_recipe(model: Path, run: Path, corpus: Path, tokens: int) -> Recipe:
    """The mini recipe for model; the control (the source itself) trains on lm alone, as the study's does."""
    control = {"loss": "lm"} if model == MINI_SOURCE else {}
    return load_options(Recipe, os.path.relpath(MINI_RECIPE), flags={
        "model": str(model), "source": str(MINI_SOURCE), "data": str(corpus / "train.jsonl"),
        "eval_data": str(corpus / "heldout.jsonl"), "out": str(run), "budget": {"tokens": tokens}, **control})


def uptrain_in_parallel(recipes: dict[str, Recipe], args: argparse.Namespace) -> dict[str, Path]:
    """The candidate and its control at once, one process and one core each (at this size two one-thread
    processes train 1.2x the tokens of one two-thread process)."""
    from uptrain.cli import FLAGS

    todo = {}
    for name, recipe in recipes.items():
        resume = resume_or_reset(RunFolder(recipe.out), recipe, args.force)
        if resume is None:
            continue
        console.print(f"[bold]$ {command_line('uptrain', recipe, FLAGS, os.path.relpath(MINI_RECIPE))}[/]",
                      highlight=False, soft_wrap=True)
        todo[name] = (recipe, resume)
    with fresh_processes(2, one_thread=True, preload=PRELOAD) as pool:
        futures = {name: pool.submit(measured, uptrain.run, recipe, {"resume": resume})
                   for name, (recipe, resume) in todo.items()}
        for name, future in futures.items():
            PEAKS["uptrain"] = max(PEAKS.get("uptrain", 0.0), future.result()[1])
    return {name: RunFolder(recipe.out).final for name, recipe in recipes.items()}


def mini_completions(models: dict[str, Path], new_tokens: int) -> dict[str, list[str]]:
    """(In a child.) Each model's greedy continuation of the code prompts."""
    from common.sources import load_causal_lm, load_tokenizer
    from validate.samples import greedy_answers

    return {name: greedy_answers(load_causal_lm(path), load_tokenizer(path), CODE_PROMPTS, new_tokens)
            for name, path in models.items()}


def default_wikitext_test() -> Path:
    from common.sources import default_wikitext

    return default_wikitext("test")


def print_mini_summary(report, said: dict[str, list[str]], layout: str, share: float, manifest: dict) -> None:
    data, models = report.data, report.data["models"]
    kv_source, kv = models["source"]["kv_bytes_per_token_measured"], models["candidate"]["kv_bytes_per_token_measured"]
    table = Table(title=f"{layout} on the mini source after {100 * share:g}% of its pretraining tokens "
                        f"({round(share * manifest['tokens']):,} of {manifest['tokens']:,})")
    for col in ("text", "source", "control", layout, f"{layout} / control (95% CI)"):
        table.add_column(col, justify="right")
    for text in data["texts"]:
        ppl, cmp = text["perplexity"], text["comparison"]
        table.add_row(text["name"], f"{ppl['source']:.2f}", f"{ppl['control']:.2f}", f"{ppl['candidate']:.2f}",
                      f"x{cmp['ratio']:.3f} ({cmp['ci_low']:.3f}-{cmp['ci_high']:.3f})")
    table.add_row("KV bytes/token", f"{kv_source:,.0f}", f"{kv_source:,.0f}", f"{kv:,.0f} (-{100 * (1 - kv / kv_source):.0f}%)", "")
    console.print(table)
    verdict = data["verdict"]
    console.print(f"[bold {'green' if verdict['pass'] else 'red'}]{'PASS' if verdict['pass'] else 'FAIL'}[/]: "
                  f"{verdict['summary']} (tolerance {verdict['tolerance']:g} against the control)")
    answers = Table(title="greedy code completions")
    for col in ("prompt", "model", "completion"):
        answers.add_column(col)
    for i, prompt in enumerate(CODE_PROMPTS):
        for k, (name, completions) in enumerate(said.items()):
            answers.add_row(prompt.strip() if k == 0 else "", name, completions[i], end_section=k == len(said) - 1)
    console.print(answers)
