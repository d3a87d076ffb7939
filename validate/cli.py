"""`run.py validate`: is the converted model at parity with its reference?

Perplexity of source, candidate (and control) on the same tokens of each held-out text, a paired
bootstrap interval for the ratio, KV-cache bytes per token measured from the cache, decode speed.
Exit code 0 when the candidate is within --tolerance of the reference on every text, 1 when not,
2 on bad input. The reference is the control when one is given (see README: fair parity).
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from common.console import console
from common.data import read_text
from common.errors import UserError
from common.sources import OOD_TEXT, default_wikitext, load_causal_lm, load_tokenizer, resolve_model_path

from .bootstrap import ratio_interval
from .kvcache import arithmetic_bytes_per_token, measure_decode
from .perplexity import score_windows
from .report import render_console, write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--candidate", required=True, help="converted checkpoint folder")
    parser.add_argument("--source", default=None, help="source checkpoint or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--control", default=None, help="the source uptrained with the same recipe; becomes the reference")
    parser.add_argument("--data", action="append", default=None,
                        help="held-out text: file, JSONL or datasets dataset (repeatable; default WikiText-2 test + Python docs)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens per text, 0 = all (default 16384)")
    parser.add_argument("--context", type=int, default=512, help="window length (default 512)")
    parser.add_argument("--stride", type=int, default=256, help="window stride (default 256)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="allowed relative ppl excess (default 0.01)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--decode-lengths", default="128,512", help="contexts for decode speed (default 128,512)")
    parser.add_argument("--decode-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="report folder (default runs/validate-<candidate>)")


def check_args(args: argparse.Namespace) -> None:
    if not Path(args.candidate).is_dir():
        raise UserError(f"candidate {args.candidate} is not a checkpoint folder")
    if args.control and not Path(args.control).is_dir():
        raise UserError(f"control {args.control} is not a checkpoint folder")
    if args.context < 2 or not 1 <= args.stride <= args.context:
        raise UserError("need --context >= 2 and 1 <= --stride <= --context")
    if args.max_tokens < 0 or args.tolerance < 0:
        raise UserError("--max-tokens and --tolerance must not be negative")


def same_tokenizer(reference, other, sample: str) -> bool:
    return reference.get_vocab() == other.get_vocab() and reference(sample)["input_ids"] == other(sample)["input_ids"]


def held_out_texts(args: argparse.Namespace) -> list[tuple[str, str]]:
    specs = args.data or [str(default_wikitext("test")), str(OOD_TEXT)]
    texts = []
    for spec in specs:
        path = Path(spec)
        name = f"{path.parent.name}/{path.stem}" if path.is_file() else spec
        texts.append((name, read_text(spec, split="test")))
    return texts


def tokenized_texts(texts: list[tuple[str, str]], args: argparse.Namespace, tokenizer=None) -> list:
    """(name, 1-D token ids) per text, cut to --max-tokens; every model is scored on exactly these ids."""
    tokenizer = tokenizer or load_tokenizer(resolve_model_path(args.source))
    token_sets = []
    for name, text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        ids = ids[: args.max_tokens] if args.max_tokens else ids
        if len(ids) < 2:
            raise UserError(f"held-out text {name} has fewer than 2 tokens")
        token_sets.append((name, ids))
    return token_sets


def evaluate_model(path, token_sets, args) -> dict:
    model = load_causal_lm(path, attn_implementation="sdpa")
    lengths = [int(x) for x in args.decode_lengths.split(",") if x]
    result = {
        "path": str(path),
        "parameters": sum(p.numel() for p in model.parameters()),
        "scores": [score_windows(model, ids, args.context, args.stride, f"ppl {name}") for name, ids in token_sets],
        "decode": [measure_decode(model, n, args.decode_new_tokens, args.seed) for n in lengths],
        "kv_bytes_per_token_arithmetic": arithmetic_bytes_per_token(model.config, model.dtype),
    }
    result["kv_bytes_per_token_measured"] = result["decode"][-1]["kv_bytes_per_token"] if lengths else None
    del model
    gc.collect()
    return result


def main(args: argparse.Namespace) -> int:
    check_args(args)
    torch.manual_seed(args.seed)
    paths = {"source": resolve_model_path(args.source), "candidate": Path(args.candidate)}
    if args.control:
        paths["control"] = Path(args.control)
    texts = held_out_texts(args)
    tokenizers = {role: load_tokenizer(path) for role, path in paths.items()}
    for role in ("candidate", "control"):
        if role in tokenizers and not same_tokenizer(tokenizers["source"], tokenizers[role], texts[0][1][:4000]):
            raise UserError(f"the {role} tokenizer differs from the source's; perplexities would not be comparable")
    token_sets = tokenized_texts(texts, args, tokenizers["source"])

    results = {role: evaluate_model(path, token_sets, args) for role, path in paths.items()}
    reference = "control" if args.control else "source"
    report_texts, verdict = [], True
    for t, (name, ids) in enumerate(token_sets):
        cand, ref = results["candidate"]["scores"][t], results[reference]["scores"][t]
        ratio = cand.perplexity / ref.perplexity
        low, high = ratio_interval(cand, ref, args.bootstrap, args.seed)
        passed = ratio <= 1 + args.tolerance
        verdict &= passed
        report_texts.append({
            "name": name, "tokens": len(ids),
            "perplexity": {role: res["scores"][t].perplexity for role, res in results.items()},
            "comparison": {"reference": reference, "ratio": ratio, "ci_low": low, "ci_high": high, "pass": passed},
        })
    report = {
        "verdict": {
            "pass": verdict, "reference": reference,
            "rule": f"candidate ppl <= (1 + {args.tolerance}) x {reference} ppl on every held-out text",
            "summary": ", ".join(f"{t['name']} ratio {t['comparison']['ratio']:.4f}" for t in report_texts),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("module", "command")},
        "decode_lengths": [int(x) for x in args.decode_lengths.split(",") if x],
        "texts": report_texts,
        "models": {role: {k: v for k, v in res.items() if k != "scores"} for role, res in results.items()},
    }
    out = Path(args.out) if args.out else Path("runs") / f"validate-{Path(args.candidate).resolve().name}"
    write_report(report, out)
    render_console(report)
    console.print(f"report: {out / 'report.md'}")
    return 0 if verdict else 1
