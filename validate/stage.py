"""The validate stage, `run(ValidateOptions) -> Report`: is the converted model at parity with its reference?

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

import dataclasses
import gc
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from common.console import console
from common.data import read_text
from common.errors import UserError
from common.options import flag_name, shown
from common.outputs import check_output_path, check_outside_inputs
from common.sources import (
    OOD_TEXT,
    check_fits,
    default_wikitext,
    is_gguf,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    resolve_model_path,
)

from . import passkey, tasks
from .bootstrap import ratio_interval
from .check import Check
from .checks import CHECKS
from .kvcache import kv_bytes_per_token, measure_decode
from .options import DEFAULT_CONTEXT, DEFAULT_DECODE, ValidateOptions
from .perplexity import WindowScores, score_windows
from .report import render_console, write_report

def model_path(role: str, value: str | None) -> Path:
    """A model folder, a .gguf file, or the embedded default (None / 'default')."""
    if value is not None and value != "default":
        path = Path(value).expanduser()
        if not (path.is_dir() or is_gguf(path)):
            raise UserError(f"{role} {value} is not a checkpoint folder or .gguf file")
    return resolve_model_path(value)


def check_args(opts: ValidateOptions) -> tuple[dict[str, Path], ValidateOptions]:
    """The model paths, in report column order, and the options with the defaults that depend on the
    models chosen, all checked before anything is loaded."""
    tasks.check_args(opts)
    paths = {"source": model_path("source", opts.source)}
    if opts.control:
        paths["control"] = model_path("control", opts.control)
    paths["candidate"] = model_path("candidate", opts.candidate)
    opts = fitted_defaults(opts, paths)
    check_positions(paths, opts)
    passkey.check_positions(opts, paths)
    return paths, opts


def fitted_defaults(opts: ValidateOptions, paths: dict[str, Path]) -> ValidateOptions:
    """opts with the defaults that depend on the models' positions chosen, and the choice printed:
    the context (at most DEFAULT_CONTEXT), the stride (half the context), the decode lengths (those
    of DEFAULT_DECODE that fit, else the longest that does) and the passkey lengths."""
    limits = [limit for limit in map(max_positions, paths.values()) if limit is not None]
    limit = min(limits, default=None)
    chosen = {}
    if opts.context is None:
        chosen["context"] = min(DEFAULT_CONTEXT, limit or DEFAULT_CONTEXT)
    context = chosen.get("context", opts.context)
    if opts.stride is None:
        chosen["stride"] = max(1, context // 2)
    elif opts.stride > context:
        raise UserError(f"--stride {opts.stride} must be at most the context, {context} (the models' "
                        f"max_position_embeddings); give --stride {context} or less")
    if opts.decode_lengths is None:
        chosen["decode_lengths"] = decode_defaults(opts, limit)
    if passkey.settings(opts) is not None and opts.passkey_lengths is None:
        chosen["passkey_lengths"] = ",".join(map(str, passkey.default_lengths(limit)))
    if chosen:
        where = f"the models' {limit} positions" if limit else "no max_position_embeddings given"
        console.print(f"defaults chosen for {where}: " + " ".join(f"{flag_name(k)} {shown(v)}" for k, v in chosen.items()),
                      highlight=False)
    return dataclasses.replace(opts, **chosen)


def decode_defaults(opts: ValidateOptions, limit: int | None) -> tuple[int, ...]:
    room = None if limit is None else limit - 1 - opts.decode_new_tokens  # the prompt, a warm-up step, the timed steps
    fits = tuple(n for n in DEFAULT_DECODE if room is None or n <= room)
    if fits:
        return fits
    if room < 1:
        raise UserError(f"--decode-new-tokens {opts.decode_new_tokens} leaves no position to decode from in the "
                        f"models' {limit}; give --decode-new-tokens {limit - 2} or less")
    return (room,)


def check_positions(paths: dict[str, Path], opts: ValidateOptions) -> None:
    """--context and the decode runs fit in every model's positions (read from its config, not loaded)."""
    longest = max(opts.decode_lengths)
    decoded = longest + 1 + opts.decode_new_tokens  # the prompt, one untimed warm-up step, the timed steps
    check_fits(paths, opts.context, lambda role, limit: f"--context {opts.context} is longer than the {role}'s "
                                                        f"max_position_embeddings {limit}; use --context {limit} or less")
    check_fits(paths, decoded, lambda role, limit: f"--decode-lengths {longest} needs {decoded} positions with "
                                                   f"--decode-new-tokens {opts.decode_new_tokens}, more than the "
                                                   f"{role}'s max_position_embeddings {limit}")


def report_folder(opts: ValidateOptions, paths: dict[str, Path]) -> Path:
    """--out, or the default folder for the candidate; refused before any scoring if a file is in the
    way or it lies inside an input (a model, a text, the prompts)."""
    out = Path(opts.out) if opts.out else default_out(paths["candidate"])
    inputs = {**paths, "behaviour prompts": opts.behaviour_prompts, "tasks path": opts.tasks_path}
    inputs.update((f"data {spec}", spec) for spec in opts.data or () if Path(spec).expanduser().exists())
    check_outside_inputs(out, inputs)
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file; give a folder for report.json and report.md")
    check_output_path(out)
    return out


def held_out_texts(opts: ValidateOptions) -> list[tuple[str, str]]:
    """(name, text) per held-out text: --data, or WikiText-2 test (in domain) + Python docs (out of domain)."""
    specs = opts.data or [str(default_wikitext("test")), str(OOD_TEXT)]
    texts = []
    for spec in specs:
        path = Path(spec)
        name = f"{path.parent.name}/{path.stem}" if path.is_file() else str(spec)
        texts.append((name, read_text(spec, split="test")))
    return texts


def tokenized_texts(texts: list[tuple[str, str]], opts: ValidateOptions, tokenizer=None) -> list:
    """(name, 1-D token ids) per text, cut to --max-tokens; every model is scored on exactly these ids."""
    tokenizer = tokenizer or load_tokenizer(resolve_model_path(opts.source))
    token_sets = []
    for name, text in texts:
        # verbose=False: a whole text, windowed below, is longer than model_max_length by design
        ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
        ids = ids[: opts.max_tokens] if opts.max_tokens else ids
        if len(ids) < 2:
            raise UserError(f"held-out text {name} has fewer than 2 tokens")
        token_sets.append((name, ids))
    return token_sets


def check_same_tokens(paths: dict[str, Path], texts, opts: ValidateOptions, source_tokenizer) -> list:
    """The source's token ids, after checking every other model's tokenizer yields the very same ids."""
    token_sets = tokenized_texts(texts, opts, source_tokenizer)
    for role, path in paths.items():
        if path == paths["source"]:
            continue
        other = load_tokenizer(path)
        if other.get_vocab() != source_tokenizer.get_vocab():
            raise UserError(f"the {role} tokenizer differs from the source's (vocabulary); "
                            "perplexities would not be comparable: give both the same tokenizer files")
        for (name, ids), (_, other_ids) in zip(token_sets, tokenized_texts(texts, opts, other)):
            if not torch.equal(ids, other_ids):
                raise UserError(f"the {role} tokenizer differs from the source's (it encodes {name} differently); "
                                "perplexities would not be comparable: give both the same tokenizer files")
    return token_sets


def evaluate_model(role: str, path: Path, token_sets, opts: ValidateOptions, checks: list[Check]) -> dict:
    """Load one model (only one is in memory at a time), score every text, measure its KV cache and speed,
    and run the checks asked for (with the source's tokenizer, checked equal to its own)."""
    model = load_causal_lm(path, attn_implementation="sdpa")
    top_id = max(int(ids.max()) for _, ids in token_sets)
    if top_id >= model.config.vocab_size:
        raise UserError(f"the {role} model has {model.config.vocab_size} embeddings but the text has token id "
                        f"{top_id}: its tokenizer does not belong to it")
    decode = [measure_decode(model, n, opts.decode_new_tokens, opts.seed) for n in opts.decode_lengths]
    result = {
        "path": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "scores": [score_windows(model, ids, opts.context, opts.stride, f"{role} ppl {name}") for name, ids in token_sets],
        "decode": decode,
        "kv_bytes_per_token_arithmetic": kv_bytes_per_token(model.config, model.dtype.itemsize),
        "kv_bytes_per_token_measured": decode[-1]["kv_bytes_per_token"],
    }
    for check in checks:
        result[check.name] = check.evaluate(model, role)
    del model
    gc.collect()
    return result


def compare(candidate: WindowScores, reference: WindowScores, opts: ValidateOptions) -> dict:
    """Point ratio, paired-bootstrap 95% CI, and whether the CI excludes 1 (a real difference).

    What the scores cannot give is None, never a made-up number: the ratio and CI when a model
    diverged (perplexity inf), the CI from a single window (nothing to resample)."""
    if not (math.isfinite(candidate.perplexity) and math.isfinite(reference.perplexity)):
        return {"ratio": None, "ci_low": None, "ci_high": None, "real_difference": None, "diverged": True}
    interval = ratio_interval(candidate, reference, opts.bootstrap, opts.seed)
    low, high = interval or (None, None)
    return {"ratio": candidate.perplexity / reference.perplexity, "ci_low": low, "ci_high": high,
            "real_difference": None if interval is None else not low <= 1.0 <= high, "diverged": False}


def verdict_rule(reference: str, tolerance: float) -> str:
    return (f"PASS when, on every held-out text, candidate ppl <= (1 + {tolerance:g}) x {reference} ppl "
            "(point estimate on identical tokens; a candidate better than the reference passes; a diverged model, "
            "perplexity inf, fails). The 95% CI is a paired bootstrap over windows (2 or more): an interval that "
            "excludes 1 marks a real difference.")


def build_report(opts: ValidateOptions, token_sets, results: dict[str, dict]) -> dict:
    reference = "control" if "control" in results else "source"
    texts = []
    for t, (name, ids) in enumerate(token_sets):
        scores = {role: res["scores"][t] for role, res in results.items()}
        entry = {
            "name": name,
            "tokens": len(ids),
            "windows": len(scores["candidate"].nll),
            "perplexity": {role: s.perplexity for role, s in scores.items()},
            "comparison": dict(compare(scores["candidate"], scores[reference], opts), reference=reference),
        }
        ratio = entry["comparison"]["ratio"]
        entry["comparison"]["pass"] = ratio is not None and ratio <= 1 + opts.tolerance
        if reference == "control":  # what the naive comparison would have said
            entry["candidate_vs_source"] = compare(scores["candidate"], scores["source"], opts)
        texts.append(entry)
    source_kv = results["source"]["kv_bytes_per_token_measured"]
    models = {}
    for role, res in results.items():
        models[role] = {k: v for k, v in res.items() if k not in ("scores", *(check.name for check in CHECKS))}
        models[role]["kv_saving_vs_source"] = 1 - res["kv_bytes_per_token_measured"] / source_kv
    passed = all(text["comparison"]["pass"] for text in texts)
    summary = ", ".join(f"{t['name']} " + ("diverged" if t["comparison"]["diverged"] else
                                           f"ratio {t['comparison']['ratio']:.4f}") for t in texts)
    rule = verdict_rule(reference, opts.tolerance)
    extra = {}
    for check in CHECKS:
        if check.name not in results["candidate"]:
            continue
        extra[check.name] = check.section({r: res[check.name] for r, res in results.items()}, reference, opts)
        vote = check.vote(extra[check.name], reference, opts)
        if vote is not None:
            passed, summary, rule = passed and vote.passed, f"{summary}; {vote.summary}", f"{rule} {vote.rule}"
    return {
        "verdict": {
            "pass": passed, "exit_code": 0 if passed else 1, "reference": reference,
            "tolerance": opts.tolerance, "rule": rule, "summary": summary,
        },
        "settings": dataclasses.asdict(opts),
        "decode_lengths": list(opts.decode_lengths),
        "texts": texts,
        "models": models,
        **extra,
    }


def default_out(candidate: Path) -> Path:
    return Path("runs") / f"validate-{candidate.stem if is_gguf(candidate) else candidate.resolve().name}"


@dataclass
class Report:
    """A validation's outcome: the report (report.json's content) and the folder it was written to."""
    data: dict
    folder: Path

    @property
    def passed(self) -> bool:
        return self.data["verdict"]["pass"]

    @property
    def exit_code(self) -> int:
        return self.data["verdict"]["exit_code"]


def run(opts: ValidateOptions) -> Report:
    """Score source, control and candidate on the same tokens; write and print the report."""
    paths, opts = check_args(opts)
    out = report_folder(opts, paths)
    tokenizer = load_tokenizer(paths["source"])
    # before the texts: unknown tasks and unreachable task data are the likeliest mistakes
    checks = [made for check in CHECKS if (made := check.prepare(opts, tokenizer, paths)) is not None]
    texts = held_out_texts(opts)
    token_sets = check_same_tokens(paths, texts, opts, tokenizer)
    torch.manual_seed(opts.seed)
    # in paths' order: the source first, whose behaviour answers the later models are scored on
    results = {role: evaluate_model(role, path, token_sets, opts, checks) for role, path in paths.items()}
    report = build_report(opts, token_sets, results)
    write_report(report, out)
    for check in checks:
        check.write_files(report[check.name], out)
    render_console(report)
    console.print(f"report: {out / 'report.md'}")
    return Report(report, out)
