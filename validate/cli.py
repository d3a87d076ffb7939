"""`run.py validate`: is the converted model at parity with its reference?

Perplexity of source, control (when given) and candidate on exactly the same tokens of each
held-out text, a paired bootstrap interval for the candidate/reference ratio, KV-cache bytes per
token measured from the cache next to the arithmetic, parameter counts, decode speed.

Exit code 0 when the candidate's perplexity is at most (1 + --tolerance) x the reference's on every
held-out text, 1 when not, 2 on bad input. The reference is the control when one is given: the
source uptrained with the same recipe, so that gains from adapting to the uptraining domain are not
mistaken for recovered quality (issue 9). By default two texts are scored, in-domain WikiText-2 test
and out-of-domain Python documentation (data/), each cut to its first --max-tokens tokens.
"""
from __future__ import annotations

import argparse
import gc
import math
from pathlib import Path

import torch

from common.console import console
from common.data import read_text
from common.errors import UserError
from common.outputs import user_os_errors
from common.sources import (
    OOD_TEXT,
    default_wikitext,
    is_gguf,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    resolve_model_path,
)

from . import passkey, tasks
from .bootstrap import ratio_interval
from .kvcache import arithmetic_bytes_per_token, measure_decode
from .perplexity import WindowScores, score_windows
from .report import render_console, write_report

DEFAULT_MAX_TOKENS = 16384


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", required=True, help="converted checkpoint folder (or .gguf, or 'default')")
    parser.add_argument("--source", default=None, help="source checkpoint or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--control", default=None,
                        help="the source uptrained with the candidate's recipe; becomes the verdict's reference")
    parser.add_argument("--data", action="append", default=None,
                        help="held-out text: .txt, .jsonl or datasets dataset; repeatable, replaces the defaults "
                             "(WikiText-2 test + Python docs)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"score the first N tokens of each text, 0 = all (default {DEFAULT_MAX_TOKENS}: "
                             "a few minutes for a 135M model on 2 CPU cores)")
    parser.add_argument("--context", type=int, default=512, help="sliding-window length in tokens (default 512)")
    parser.add_argument("--stride", type=int, default=256, help="sliding-window step in tokens (default 256)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="pass when candidate ppl <= (1 + tolerance) x reference ppl (default 0.01)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CI (default 1000)")
    parser.add_argument("--decode-lengths", default="128,512",
                        help="comma-separated context lengths for KV bytes and decode tokens/s (default 128,512)")
    parser.add_argument("--decode-new-tokens", type=int, default=16, help="timed greedy decode steps (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the bootstrap and the decode prompts")
    parser.add_argument("--out", default=None, help="report folder (default runs/validate-<candidate name>)")
    tasks.add_arguments(parser)
    passkey.add_arguments(parser)


def model_path(role: str, value: str | None) -> Path:
    """A model folder, a .gguf file, or the embedded default (None / 'default')."""
    if value is not None and value != "default":
        path = Path(value).expanduser()
        if not (path.is_dir() or is_gguf(path)):
            raise UserError(f"{role} {value} is not a checkpoint folder or .gguf file")
    return resolve_model_path(value)


def decode_lengths(spec: str) -> list[int]:
    try:
        lengths = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise UserError(f"--decode-lengths {spec!r} must be positive integers separated by commas, e.g. 128,512")
    return lengths


def check_args(args: argparse.Namespace) -> dict[str, Path]:
    """Every flag checked before anything is loaded; returns the model paths, in report column order."""
    if args.context < 2 or not 1 <= args.stride <= args.context:
        raise UserError("need --context >= 2 and 1 <= --stride <= --context")
    if args.max_tokens < 0 or args.tolerance < 0:
        raise UserError("--max-tokens and --tolerance must not be negative")
    if args.bootstrap < 1 or args.decode_new_tokens < 1:
        raise UserError("--bootstrap and --decode-new-tokens must be at least 1")
    decode_lengths(args.decode_lengths)
    tasks.check_args(args)
    passkey.settings(args)
    paths = {"source": model_path("source", args.source)}
    if args.control:
        paths["control"] = model_path("control", args.control)
    paths["candidate"] = model_path("candidate", args.candidate)
    check_positions(paths, args)
    passkey.check_positions(args, paths)
    return paths


def check_positions(paths: dict[str, Path], args: argparse.Namespace) -> None:
    """--context and the decode runs fit in every model's positions (read from its config, not loaded)."""
    longest = max(decode_lengths(args.decode_lengths))
    decoded = longest + 1 + args.decode_new_tokens  # the prompt, one untimed warm-up step, the timed steps
    for role, path in paths.items():
        limit = max_positions(path)
        if limit is None:  # the config does not say: loading the model will
            continue
        if args.context > limit:
            raise UserError(f"--context {args.context} is longer than the {role}'s max_position_embeddings {limit}; "
                            f"use --context {limit} or less")
        if decoded > limit:
            raise UserError(f"--decode-lengths {longest} needs {decoded} positions with --decode-new-tokens "
                            f"{args.decode_new_tokens}, more than the {role}'s max_position_embeddings {limit}")


def report_folder(args: argparse.Namespace, candidate: Path) -> Path:
    """--out, or the default folder for the candidate; refused before any scoring if a file is in the way."""
    out = Path(args.out) if args.out else default_out(candidate)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file; give a folder for report.json and report.md")
    return out


def held_out_texts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, text) per held-out text: --data, or WikiText-2 test (in domain) + Python docs (out of domain)."""
    specs = args.data or [str(default_wikitext("test")), str(OOD_TEXT)]
    texts = []
    for spec in specs:
        path = Path(spec)
        name = f"{path.parent.name}/{path.stem}" if path.is_file() else str(spec)
        texts.append((name, read_text(spec, split="test")))
    return texts


def tokenized_texts(texts: list[tuple[str, str]], args: argparse.Namespace, tokenizer=None) -> list:
    """(name, 1-D token ids) per text, cut to --max-tokens; every model is scored on exactly these ids."""
    tokenizer = tokenizer or load_tokenizer(resolve_model_path(args.source))
    token_sets = []
    for name, text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        ids = ids[: args.max_tokens] if args.max_tokens else ids
        if len(ids) < 2:
            raise UserError(f"held-out text {name} has fewer than 2 tokens")
        token_sets.append((name, ids))
    return token_sets


def check_same_tokens(paths: dict[str, Path], texts, args, source_tokenizer) -> list:
    """The source's token ids, after checking every other model's tokenizer yields the very same ids."""
    token_sets = tokenized_texts(texts, args, source_tokenizer)
    for role, path in paths.items():
        if path == paths["source"]:
            continue
        other = load_tokenizer(path)
        if other.get_vocab() != source_tokenizer.get_vocab():
            raise UserError(f"the {role} tokenizer differs from the source's (vocabulary); "
                            "perplexities would not be comparable: give both the same tokenizer files")
        for (name, ids), (_, other_ids) in zip(token_sets, tokenized_texts(texts, args, other)):
            if not torch.equal(ids, other_ids):
                raise UserError(f"the {role} tokenizer differs from the source's (it encodes {name} differently); "
                                "perplexities would not be comparable: give both the same tokenizer files")
    return token_sets


def evaluate_model(role: str, path: Path, token_sets, args, tokenizer=None, prompts=None, task_set=None) -> dict:
    """Load one model (only one is in memory at a time), score every text, measure its KV cache and speed;
    the passkey prompts and lm-eval tasks, when given, with the source's tokenizer (checked equal to its own)."""
    model = load_causal_lm(path, attn_implementation="sdpa")
    top_id = max(int(ids.max()) for _, ids in token_sets)
    if top_id >= model.config.vocab_size:
        raise UserError(f"the {role} model has {model.config.vocab_size} embeddings but the text has token id "
                        f"{top_id}: its tokenizer does not belong to it")
    decode = [measure_decode(model, n, args.decode_new_tokens, args.seed) for n in decode_lengths(args.decode_lengths)]
    result = {
        "path": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "scores": [score_windows(model, ids, args.context, args.stride, f"{role} ppl {name}") for name, ids in token_sets],
        "decode": decode,
        "kv_bytes_per_token_arithmetic": arithmetic_bytes_per_token(model.config, model.dtype),
        "kv_bytes_per_token_measured": decode[-1]["kv_bytes_per_token"],
    }
    if prompts:
        result["passkey"] = passkey.evaluate(model, tokenizer, prompts, f"{role} passkey")
    if task_set:
        result["tasks"] = tasks.evaluate(model, tokenizer, task_set)
    del model
    gc.collect()
    return result


def compare(candidate: WindowScores, reference: WindowScores, args) -> dict:
    """Point ratio, paired-bootstrap 95% CI, and whether the CI excludes 1 (a real difference).

    What the scores cannot give is None, never a made-up number: the ratio and CI when a model
    diverged (perplexity inf), the CI from a single window (nothing to resample)."""
    if not (math.isfinite(candidate.perplexity) and math.isfinite(reference.perplexity)):
        return {"ratio": None, "ci_low": None, "ci_high": None, "real_difference": None, "diverged": True}
    interval = ratio_interval(candidate, reference, args.bootstrap, args.seed)
    low, high = interval or (None, None)
    return {"ratio": candidate.perplexity / reference.perplexity, "ci_low": low, "ci_high": high,
            "real_difference": None if interval is None else not low <= 1.0 <= high, "diverged": False}


def verdict_rule(reference: str, tolerance: float) -> str:
    return (f"PASS when, on every held-out text, candidate ppl <= (1 + {tolerance:g}) x {reference} ppl "
            "(point estimate on identical tokens; a candidate better than the reference passes; a diverged model, "
            "perplexity inf, fails). The 95% CI is a paired bootstrap over windows (2 or more): an interval that "
            "excludes 1 marks a real difference.")


def build_report(args, token_sets, results: dict[str, dict]) -> dict:
    reference = "control" if "control" in results else "source"
    texts = []
    for t, (name, ids) in enumerate(token_sets):
        scores = {role: res["scores"][t] for role, res in results.items()}
        entry = {
            "name": name,
            "tokens": len(ids),
            "windows": len(scores["candidate"].nll),
            "perplexity": {role: s.perplexity for role, s in scores.items()},
            "comparison": dict(compare(scores["candidate"], scores[reference], args), reference=reference),
        }
        ratio = entry["comparison"]["ratio"]
        entry["comparison"]["pass"] = ratio is not None and ratio <= 1 + args.tolerance
        if reference == "control":  # what the naive comparison would have said
            entry["candidate_vs_source"] = compare(scores["candidate"], scores["source"], args)
        texts.append(entry)
    source_kv = results["source"]["kv_bytes_per_token_measured"]
    models = {}
    for role, res in results.items():
        models[role] = {k: v for k, v in res.items() if k not in ("scores", "passkey", "tasks")}
        models[role]["kv_saving_vs_source"] = 1 - res["kv_bytes_per_token_measured"] / source_kv
    passed = all(text["comparison"]["pass"] for text in texts)
    summary = ", ".join(f"{t['name']} " + ("diverged" if t["comparison"]["diverged"] else
                                           f"ratio {t['comparison']['ratio']:.4f}") for t in texts)
    rule = verdict_rule(reference, args.tolerance)
    extra = {}
    if "tasks" in results["candidate"]:
        extra["tasks"] = tasks.compare({r: res["tasks"] for r, res in results.items()}, reference,
                                       args.max_accuracy_drop)
        if args.max_accuracy_drop is not None:
            passed = passed and tasks.passed(extra["tasks"])
            summary += "; " + tasks.summary(extra["tasks"])
            rule += (f" And on every task, candidate accuracy >= {reference} accuracy - {args.max_accuracy_drop:g} "
                     "(point estimate, same examples).")
    if "passkey" in results["candidate"]:
        extra["passkey"] = passkey.table({r: res["passkey"] for r, res in results.items()})
    return {
        "verdict": {
            "pass": passed, "exit_code": 0 if passed else 1, "reference": reference,
            "tolerance": args.tolerance, "rule": rule, "summary": summary,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("module", "command")},
        "decode_lengths": decode_lengths(args.decode_lengths),
        "texts": texts,
        "models": models,
        **extra,
    }


def default_out(candidate: Path) -> Path:
    return Path("runs") / f"validate-{candidate.stem if is_gguf(candidate) else candidate.resolve().name}"


def main(args: argparse.Namespace) -> int:
    paths = check_args(args)
    out = report_folder(args, paths["candidate"])
    task_set = tasks.load_tasks(args)  # unknown tasks and unreachable data fail first: the likeliest mistakes
    texts = held_out_texts(args)
    tokenizer = load_tokenizer(paths["source"])
    token_sets = check_same_tokens(paths, texts, args, tokenizer)
    chosen = passkey.settings(args)
    prompts = passkey.build_prompts(tokenizer, *chosen, args.seed) if chosen else None
    torch.manual_seed(args.seed)
    results = {role: evaluate_model(role, path, token_sets, args, tokenizer, prompts, task_set)
               for role, path in paths.items()}
    report = build_report(args, token_sets, results)
    write_report(report, out)
    if "passkey" in report:
        with user_os_errors(out):
            passkey.plot(report["passkey"], out / "passkey.png", f"passkey retrieval: {out.name}")
    render_console(report)
    console.print(f"report: {out / 'report.md'}")
    return report["verdict"]["exit_code"]
