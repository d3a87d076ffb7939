"""Passkey retrieval: can the model fetch one fact from far back in a long context? No data needed.

A random key (5 digits) is stated once inside repeated filler text, at a chosen depth, and the
model is asked to repeat it; greedy decoding through the model's own ``generate()`` (so a converted
model answers from its layout's shared cache), exact match on the first number it writes. Cache
sharing hurts here first: the key is one fact that only the cache still holds.

A context length L counts every position the model sees: a prompt of exactly L - N tokens and the
N generated ones, so L may equal max_position_embeddings. The depth is the fraction of the filler
before the key, snapped to a filler sentence boundary. Keys come from --seed: every model answers
exactly the same prompts.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import torch

from common.console import progress
from common.errors import UserError
from common.outputs import user_os_errors
from common.sources import check_fits

from . import check
from .kvcache import kv_cache_bytes

if TYPE_CHECKING:
    from .options import ValidateOptions

DEFAULT_LENGTHS = (1024, 2048, 4096)
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
KEY_DIGITS = 5
SPARE_ANSWER_TOKENS = 2  # room after the key: a space or a full stop the model may write first


@dataclass
class Prompt:
    length: int  # positions: prompt tokens + answer tokens
    depth: float
    trial: int
    key: str
    ids: list[int]
    needle_at: int  # index of the needle's first token in ids
    filler_tokens: int



def settings(args: ValidateOptions) -> tuple[list[int], list[float], int] | None:
    """(lengths, depths, trials), or None when no passkey flag is given."""
    if not (args.passkey or args.passkey_lengths or args.passkey_depths or args.passkey_trials is not None):
        return None
    lengths = _numbers("--passkey-lengths", args.passkey_lengths or ",".join(map(str, DEFAULT_LENGTHS)), int)
    depths = _numbers("--passkey-depths", args.passkey_depths or "0.1,0.5,0.9", float)
    trials = 3 if args.passkey_trials is None else args.passkey_trials
    if min(lengths) < 1 or not all(0 <= d <= 1 for d in depths):
        raise UserError("need --passkey-lengths >= 1 and --passkey-depths within [0, 1]")
    return lengths, depths, trials


def default_lengths(limit: int | None) -> list[int]:
    """The default lengths that fit in limit positions, else limit itself."""
    return [n for n in DEFAULT_LENGTHS if limit is None or n <= limit] or [limit]


def _numbers(flag: str, spec: str, kind: type) -> list:
    try:
        values = sorted({kind(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values:
        raise UserError(f"{flag} {spec!r} must be numbers separated by commas")
    return values


def check_positions(args: ValidateOptions, paths: dict[str, Path]) -> None:
    """Every length fits in every model's window (read from its config, not loaded)."""
    chosen = settings(args)
    if chosen is None:
        return
    check_fits(paths, max(chosen[0]), lambda role, limit: f"--passkey-lengths {max(chosen[0])} is longer than the "
                                                          f"{role}'s max_position_embeddings {limit}; use lengths up to {limit}")


def answer_tokens(tokenizer) -> int:
    """Tokens generated per prompt: the longest key as the tokenizer writes it after a space, and spare ones."""
    return len(tokenizer(" " + "9" * KEY_DIGITS, add_special_tokens=False)["input_ids"]) + SPARE_ANSWER_TOKENS


def build_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], int, int]:
    """(ids of exactly length - answer_tokens tokens, needle index, filler tokens): intro, filler with the
    needle at depth (snapped to a sentence boundary), question."""
    intro = tokenizer(INTRO)["input_ids"]  # with the tokenizer's own BOS, if it adds one
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"]
              for text in (FILLER, NEEDLE.format(key=key), QUESTION)]
    sentence, needle, question = pieces
    fill = length - answer_tokens(tokenizer) - len(intro) - len(needle) - len(question)
    if fill < len(sentence):
        shortest = length - fill + len(sentence)
        raise UserError(f"--passkey-lengths {length} leaves no room for filler text; use {shortest} or more")
    filler = (sentence * (fill // len(sentence) + 1))[:fill]
    at = min(round(depth * fill / len(sentence)) * len(sentence), fill)
    ids = intro + filler[:at] + needle + filler[at:] + question
    return ids, len(intro) + at, fill


def build_prompts(tokenizer, lengths: list[int], depths: list[float], trials: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    prompts = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key = str(rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1))
                ids, needle_at, fill = build_prompt(tokenizer, length, depth, key)
                prompts.append(Prompt(length, depth, trial, key, ids, needle_at, fill))
    return prompts


def is_correct(answer: str, key: str) -> bool:
    """Exact match of the first number the model writes."""
    first = re.search(r"\d+", answer)
    return first is not None and first.group() == key


@torch.inference_mode()
def evaluate(model, tokenizer, prompts: list[Prompt], label: str = "passkey") -> dict:
    """Greedy answers through model.generate (the model's own cache), one prompt at a time."""
    new_tokens = answer_tokens(tokenizer)
    answers = []
    cache_bytes_per_token = None
    with progress() as bar:
        task = bar.add_task(label, total=len(prompts))
        for prompt in prompts:
            ids = torch.tensor([prompt.ids], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
            answer = tokenizer.decode(out.sequences[0, len(prompt.ids):], skip_special_tokens=True)
            answers.append({"length": prompt.length, "depth": prompt.depth, "trial": prompt.trial, "key": prompt.key,
                            "answer": answer, "correct": is_correct(answer, prompt.key)})
            cache = out.past_key_values
            cache_bytes_per_token = kv_cache_bytes(cache) / cache.get_seq_length()
            bar.advance(task)
    return {"answers": answers, "kv_bytes_per_token": cache_bytes_per_token}


def accuracy(answers: list[dict], length: int, depth: float | None = None) -> float:
    picked = [a["correct"] for a in answers if a["length"] == length and depth in (None, a["depth"])]
    return sum(picked) / len(picked)


def table(results: dict[str, dict]) -> dict:
    """Accuracy per (length, depth) and per length for every model, plus each model's answers."""
    answers = {role: res["answers"] for role, res in results.items()}
    first = next(iter(answers.values()))
    lengths = sorted({a["length"] for a in first})
    depths = sorted({a["depth"] for a in first})
    return {
        "lengths": lengths, "depths": depths, "trials": len({a["trial"] for a in first}),
        "by_length": [{"length": n, "accuracy": {r: accuracy(a, n) for r, a in answers.items()}} for n in lengths],
        "by_length_depth": [{"length": n, "depth": d, "accuracy": {r: accuracy(a, n, d) for r, a in answers.items()}}
                            for n in lengths for d in depths],
        "kv_bytes_per_token": {role: res["kv_bytes_per_token"] for role, res in results.items()},
        "answers": answers,
    }


def markdown_lines(report: dict) -> list[str]:
    passkey = report.get("passkey")
    if not passkey:
        return []
    roles = list(report["models"])
    lines = ["## Passkey retrieval", "",
             f"Exact-match accuracy over {passkey['trials']} keys per cell (greedy decoding with each model's own "
             "cache; depth = fraction of the filler before the key). Not part of the verdict. Plot: passkey.png.", "",
             "| length | depth | " + " | ".join(roles) + " |", "|---:|---:|" + "---:|" * len(roles)]
    for row in passkey["by_length_depth"]:
        lines.append(f"| {row['length']:,} | {row['depth']:g} | "
                     + " | ".join(f"{row['accuracy'][r]:.2f}" for r in roles) + " |")
    for row in passkey["by_length"]:
        lines.append(f"| {row['length']:,} | all | " + " | ".join(f"**{row['accuracy'][r]:.2f}**" for r in roles) + " |")
    return lines + [""]


def plot(passkey: dict, path: Path, title: str = "passkey retrieval") -> None:
    """One heatmap per model: accuracy by context length (x) and depth (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(passkey["answers"])
    lengths, depths = passkey["lengths"], passkey["depths"]
    fig, axes = plt.subplots(1, len(roles), figsize=(1.2 + 0.9 * len(lengths) * len(roles), 0.6 * len(depths) + 2),
                             squeeze=False)
    for ax, role in zip(axes[0], roles):
        grid = [[accuracy(passkey["answers"][role], n, d) for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
        ax.set(xticks=range(len(lengths)), xticklabels=[f"{n:,}" for n in lengths], yticks=range(len(depths)),
               yticklabels=[f"{d:g}" for d in depths], xlabel="context length", title=role)
    axes[0][0].set_ylabel("key depth")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


class Passkey(check.Check):
    """Passkey retrieval as a check of validate: every model answers the same prompts. Reported, never judged."""
    name = "passkey"

    def __init__(self, tokenizer, prompts: list[Prompt]):
        self.tokenizer, self.prompts = tokenizer, prompts

    @classmethod
    def prepare(cls, opts: ValidateOptions, tokenizer, paths: dict[str, Path]) -> Passkey | None:
        chosen = settings(opts)
        return None if chosen is None else cls(tokenizer, build_prompts(tokenizer, *chosen, opts.seed))

    def evaluate(self, model, role: str) -> dict:
        return evaluate(model, self.tokenizer, self.prompts, f"{role} passkey")

    @staticmethod
    def section(results: dict[str, dict], reference: str, opts: ValidateOptions) -> dict:
        return table(results)

    markdown_lines = staticmethod(markdown_lines)

    @staticmethod
    def write_files(section: dict, folder: Path) -> None:
        with user_os_errors(folder):
            plot(section, folder / "passkey.png", f"passkey retrieval: {folder.name}")
