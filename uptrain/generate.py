"""`run(GenerateOptions) -> Generated`: text the source model writes itself, for data-free distillation.

Uptraining on a corpus pulls a converted model towards that corpus and away from everything else
the source could do (after the demo's WikiText steps the candidate no longer answers a chat
question). Distilling (``loss: kd``) on text the source samples from its own distribution keeps the
student near the source's behaviour everywhere the source puts probability, with no dataset at all.

Each sample starts from a prompt (``prompts``: a text file, one per line, wrapped in the chat
template when the tokenizer has one) or, without prompts, from one random vocabulary token, as in
LLM-QAT (Liu et al., 2023, arXiv 2305.17888), and continues by sampling at ``temperature``. Sample
batch b is drawn with the seed (seed, b), so the file is a pure function of the options: an
interrupted run appends to its ``.partial`` file and goes on from the last whole batch. The output is
a JSON-lines file of {"text": ...} records, a data spec for ``run.py uptrain``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.console import console, progress
from common.errors import UserError
from common.outputs import check_output_path, check_outside_inputs, made_folder, user_os_error, user_os_errors
from common.options import SEEDS, Range, option


@dataclass
class GenerateOptions:
    out: str | None = option(None, "the .jsonl file to write ({\"text\": ...} per line)")
    source: str | None = option(None, "the model that writes (none: the embedded SmolLM2-135M)")
    samples: int = option(1000, "texts to write", within=Range(at_least=1))
    tokens: int = option(256, "new tokens per text (fewer where the model ends it); with the prompt, at most the "
                              "model's positions", within=Range(at_least=1))
    prompts: str | None = option(None, "a text file of prompts, one per line, used in turn "
                                       "(none: each text starts from one random token, as in LLM-QAT)")
    temperature: float = option(1.0, "sampling temperature", within=Range(above=0))
    batch: int = option(16, "texts generated together", within=Range(at_least=1))
    seed: int = option(0, "seed of the random starts and the sampling", within=Range(at_least=0, below=SEEDS))
    force: bool = option(False, "replace an existing out file")

    def check(self) -> None:
        if not self.out:
            raise UserError("give the file to write: --out FILE.jsonl")


FLAGS = tuple(GenerateOptions.__dataclass_fields__)


@dataclass
class Generated:
    path: Path
    samples: int
    tokens: int  # new tokens written, over all samples


def read_prompts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompts file {path} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompts file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read prompts file {path}: {err.strerror}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompt (one per line)")
    return prompts


def start_ids(tokenizer, prompts: list[str] | None, first: int, count: int, generator):
    """Input ids and attention mask of samples first..first+count-1: their prompts (left-padded) or
    one random token each, drawn from the vocabulary without the special tokens."""
    import torch

    if prompts is None:
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        ordinary = torch.ones(len(tokenizer), dtype=torch.bool)
        ordinary[special] = False
        choices = ordinary.nonzero().squeeze(1)
        ids = choices[torch.randint(len(choices), (count, 1), generator=generator)]
        return ids, torch.ones_like(ids)
    texts = [prompts[i % len(prompts)] for i in range(first, first + count)]
    if tokenizer.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


def texts_of(tokenizer, ids, mask, prompt_len: int) -> tuple[list[str], int]:
    """Each row's prompt and continuation up to its first end-of-text token, decoded (special
    tokens such as chat markers kept: they tokenize back to themselves); and the new tokens kept."""
    texts, kept = [], 0
    for row, row_mask in zip(ids.tolist(), mask.tolist()):
        prompt = [t for t, m in zip(row[:prompt_len], row_mask) if m]
        new = row[prompt_len:]
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        kept += len(new)
        texts.append(tokenizer.decode(prompt + new, skip_special_tokens=False))
    return texts, kept


def done_batches(partial: Path, batch: int) -> int:
    """Whole batches already in an interrupted run's file (a torn last line is dropped)."""
    if not partial.is_file():
        return 0
    lines = partial.read_text(encoding="utf-8").split("\n")[:-1]  # the text after the last newline is torn
    whole = len(lines) // batch
    partial.write_text("".join(line + "\n" for line in lines[: whole * batch]), encoding="utf-8")
    return whole


def check_out(options: GenerateOptions, source: Path) -> Path:
    """The file to write, refused in one line where it cannot or must not be written."""
    out = Path(options.out).expanduser()
    check_outside_inputs(out, {"source": source, "prompts": options.prompts})
    check_output_path(out, folder=False)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the .jsonl file to write")
    if out.exists() and not options.force:
        raise UserError(f"{out} exists; pass --force to replace it")
    return out


def check_positions(options: GenerateOptions, source: Path, prompts: list[str] | None, tokenizer) -> None:
    """The longest prompt (or the one start token) and --tokens fit in the model's positions."""
    from common.sources import max_positions

    limit = max_positions(source)
    longest = max((len(ids) for ids in tokenizer(prompts)["input_ids"]), default=1) if prompts else 1
    if limit is not None and longest + options.tokens > limit:
        raise UserError(f"--tokens {options.tokens} and a prompt of {longest} tokens need {longest + options.tokens} "
                        f"positions, more than the model's max_position_embeddings {limit}; give fewer --tokens")


def run(options: GenerateOptions) -> Generated:
    """Write the samples to a .partial file beside out, renamed into place at the end: a full disk
    removes it and is one line; an interruption keeps it for the next run to go on from."""
    import torch

    from common.sources import load_causal_lm, load_tokenizer, resolve_model_path

    source = resolve_model_path(options.source)
    out = check_out(options, source)
    prompts = read_prompts(options.prompts) if options.prompts else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(source)
    check_positions(options, source, prompts, tokenizer)
    model = load_causal_lm(source, dtype=torch.bfloat16 if device == "cuda" else torch.float32).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad
    partial = out.with_name(out.name + ".partial")
    with user_os_errors(out), made_folder(out.parent):
        try:
            new_tokens = _generate(options, model, tokenizer, prompts, partial)
            os.replace(partial, out)
        except Exception as err:
            if user_os_error(err):  # a full disk or a folder that cannot be written: nothing half-written is kept
                partial.unlink(missing_ok=True)
            raise
    console.print(f"[green]wrote[/] {out}: {options.samples} texts from {options.source or 'the embedded SmolLM2-135M'}")
    return Generated(out, options.samples, new_tokens)


def _generate(options: GenerateOptions, model, tokenizer, prompts, partial: Path) -> int:
    """Every batch not yet in partial, appended to it (on the model's device, padded with the tokenizer's
    pad token, which run() sets); returns the new tokens written."""
    import torch

    batches = -(-options.samples // options.batch)
    start = done_batches(partial, options.batch)
    if start:
        console.print(f"resuming {partial}: {start} of {batches} batches done")
    new_tokens = 0
    with partial.open("a", encoding="utf-8") as fh, progress() as bar:
        task = bar.add_task("generate", total=batches, completed=start)
        for b in range(start, batches):
            first = b * options.batch
            count = min(options.batch, options.samples - first)
            generator = torch.Generator().manual_seed(options.seed * 1_000_003 + b)
            ids, mask = start_ids(tokenizer, prompts, first, count, generator)
            torch.manual_seed(options.seed * 1_000_003 + b)  # generate() samples with the global generator
            with torch.no_grad():
                sampled = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                         do_sample=True, temperature=options.temperature, top_k=0,
                                         max_new_tokens=options.tokens, pad_token_id=tokenizer.pad_token_id)
            texts, kept = texts_of(tokenizer, sampled.cpu(), mask, ids.shape[1])
            new_tokens += kept
            fh.write("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts))
            fh.flush()
            bar.update(task, advance=1)
    return new_tokens
