"""Behaviour check: does the candidate still say what the source says, token for token?

Perplexity on WikiText scores text nobody asked for; a chat model is used by asking it things.
Here the source answers each behaviour prompt greedily (--behaviour-tokens tokens, through the chat
template when the tokenizer has one, as validate/samples.py prompts), and every other model reads
prompt + that answer in one teacher-forced forward pass. At each answer position the report gives
how often the model's most likely next token is the source's (greedy next-token agreement) and
KL(p_source || p_model) of the next-token distributions, averaged over all scored positions.
Teacher forcing keeps every model on the same text: one early wrong token cannot derail the rest
of the comparison, and the numbers do not depend on where free-running answers drift apart.

A position is scored up to and including the source's first stop token (what follows it is
padding, not an answer). The source's argmax there is taken from the same teacher-forced pass
(its greedy token, up to floating-point ties between cached and full-pass logits), so a candidate
identical to the source agrees at every position with KL 0. Prompts run in batches, left-padded
with an attention mask; every model sees exactly the same batches. The source's log-probabilities
are held in memory for the models after it: scored positions x vocabulary x 4 bytes (at most
0.75 GB for the shipped 120 prompts x 32 tokens on SmolLM2's 49k vocabulary).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from common.console import progress
from common.errors import UserError
from common.sources import PROJECT_ROOT, check_fits

from . import check
from .samples import prompt_ids

if TYPE_CHECKING:
    from .options import ValidateOptions

DEFAULT_PROMPTS = PROJECT_ROOT / "data" / "behaviour" / "prompts.txt"
DEFAULT_TOKENS = 32
# The source answers in wide batches: its decoding steps are sequential, and on 2 CPU cores SmolLM2 answered the
# 120 shipped prompts in one batch at about twice the prompts/s of batches of 32. Scoring needs logits at every
# answer position (32 x 33 x 49,152 floats: 200 MB for SmolLM2), so it runs on slices of those batches.
ANSWER_BATCH = 128
SCORE_BATCH = 32


def settings(opts: ValidateOptions) -> tuple[list[str], int] | None:
    """(prompts, tokens per prompt), or None when no behaviour option is given; every mistake is one line here,
    before a model loads."""
    if not (opts.behaviour or opts.behaviour_prompts or opts.behaviour_tokens is not None
            or opts.min_agreement is not None):
        return None
    tokens = DEFAULT_TOKENS if opts.behaviour_tokens is None else opts.behaviour_tokens  # its range: options.py
    return read_prompts(opts.behaviour_prompts), tokens


def read_prompts(spec: str | None) -> list[str]:
    """The prompts of a .txt file (one per line) or a .jsonl file ({"prompt": ...} per line); none: the shipped set."""
    path = Path(spec).expanduser() if spec else DEFAULT_PROMPTS
    flag = f"--behaviour-prompts {path}"
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise UserError(f"{flag}: give a .txt file (one prompt per line) or a .jsonl file "
                        '({"prompt": "..."} per line)')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{flag} does not exist") from None
    except OSError as err:
        raise UserError(f"cannot read {flag}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{flag} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    numbered = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    if path.suffix.lower() == ".jsonl":
        prompts = [_jsonl_prompt(flag, n, line) for n, line in numbered]
    else:
        prompts = [line for _, line in numbered]
    if not prompts:
        raise UserError(f"{flag} holds no prompt; give one per line")
    return prompts


def _jsonl_prompt(flag: str, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{flag}: line {number} is not JSON ({err.msg})") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f'{flag}: line {number} has no "prompt" text; write {{"prompt": "..."}} on each line')
    return prompt.strip()


def check_positions(prompt_tokens: list[list[int]], tokens: int, paths: dict[str, Path]) -> None:
    """The longest prompt plus its answer fits in every model's positions (read from its config, not loaded)."""
    needed = max(len(ids) for ids in prompt_tokens) + tokens
    check_fits(paths, needed, lambda role, limit: f"the longest behaviour prompt and --behaviour-tokens {tokens} need "
                                                  f"{needed} positions, more than the {role}'s max_position_embeddings "
                                                  f"{limit}; use shorter prompts or fewer tokens")


@dataclass
class Batch:
    """Prompts answered together: every model reads exactly these ids."""
    prompts: list[int]  # indices into the prompt list
    ids: torch.Tensor  # (batch, prompt width + answer length): left-padded prompts, then the source's answers
    mask: torch.Tensor  # 0 on the left padding
    scored: torch.Tensor  # (batch, answer length) bool: up to and including the first stop token
    source_logp: torch.Tensor  # (scored positions, vocabulary), on the CPU


@dataclass
class Check(check.Check):
    """The behaviour check across models loaded one at a time: the source (evaluated first) answers and
    keeps its distributions; each later model is scored against them."""
    name = "behaviour"
    tokenizer: object
    prompts: list[str]
    tokens: int
    prompt_tokens: list[list[int]] = field(init=False)
    batches: list[Batch] = field(default_factory=list, init=False)

    def __post_init__(self):
        self.prompt_tokens = [prompt_ids(self.tokenizer, p)["input_ids"][0].tolist() for p in self.prompts]

    @classmethod
    def prepare(cls, opts: ValidateOptions, tokenizer, paths: dict[str, Path]) -> Check | None:
        """The check with its prompts tokenized by the source's tokenizer, or None when not asked for."""
        chosen = settings(opts)
        if chosen is None:
            return None
        made = cls(tokenizer, *chosen)
        check_positions(made.prompt_tokens, made.tokens, paths)
        return made

    def evaluate(self, model, role: str) -> dict:
        if role == "source":
            return self.answer(model)
        return self.compare(model, role)

    @torch.inference_mode()
    def answer(self, model) -> dict:
        """The source's greedy answers, and its log-probabilities at the scored positions."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        stops = stop_ids(model, self.tokenizer)
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompt_tokens[i]))  # little padding
        answers = [""] * len(self.prompts)
        with progress() as bar:
            task = bar.add_task("source behaviour answers", total=len(order))
            for start in range(0, len(order), ANSWER_BATCH):
                indices = order[start:start + ANSWER_BATCH]
                prompts, mask = left_padded([self.prompt_tokens[i] for i in indices], pad)
                ids = model.generate(input_ids=prompts.to(model.device), attention_mask=mask.to(model.device),
                                     max_new_tokens=self.tokens, do_sample=False, eos_token_id=stops or None,
                                     pad_token_id=pad, temperature=None, top_p=None, top_k=None).cpu()
                answer = ids[:, prompts.shape[1]:]
                mask = torch.cat([mask, torch.ones_like(answer)], 1)
                is_stop = torch.isin(answer, torch.tensor(stops, dtype=torch.long))
                scored = (is_stop.cumsum(1) - is_stop.long()) == 0  # no stop token before the position
                for row, i in enumerate(indices):
                    answers[i] = self.tokenizer.decode(answer[row][scored[row]], skip_special_tokens=True)
                for first in range(0, len(indices), SCORE_BATCH):
                    rows = slice(first, first + SCORE_BATCH)
                    logp = next_token_logp(model, ids[rows], mask[rows], answer.shape[1])[scored[rows]]
                    self.batches.append(Batch(indices[rows], ids[rows], mask[rows], scored[rows], logp))
                    bar.advance(task, len(indices[rows]))
        positions = sum(int(batch.scored.sum()) for batch in self.batches)
        return {"prompts": self.prompts, "tokens": self.tokens, "positions": positions, "answers": answers}

    @torch.inference_mode()
    def compare(self, model, role: str) -> dict:
        """Greedy next-token agreement and KL(source || model) at every scored position, per prompt and pooled."""
        agree, kl, owner = [], [], []
        with progress() as bar:
            task = bar.add_task(f"{role} behaviour", total=len(self.prompts))
            for batch in self.batches:
                logp = next_token_logp(model, batch.ids, batch.mask, batch.scored.shape[1])[batch.scored]
                source = batch.source_logp
                agree.append(logp.argmax(-1) == source.argmax(-1))
                kl.append(F.kl_div(logp, source, reduction="none", log_target=True).sum(-1))
                owner.append(torch.tensor(batch.prompts)[batch.scored.nonzero()[:, 0]])
                bar.advance(task, len(batch.prompts))
        agree, kl, owner = torch.cat(agree).double(), torch.cat(kl).double(), torch.cat(owner)
        counts = torch.bincount(owner, minlength=len(self.prompts)).double()
        return {
            "agreement": agree.mean().item(), "kl": kl.mean().item(),
            "per_prompt_agreement": (torch.bincount(owner, agree, len(self.prompts)) / counts).tolist(),
            "per_prompt_kl": (torch.bincount(owner, kl, len(self.prompts)) / counts).tolist(),
        }

    # --- the report ------------------------------------------------------------------------------
    @staticmethod
    def section(results: dict[str, dict], reference: str, opts: ValidateOptions) -> dict:
        """The report's behaviour section: every model's pooled agreement and KL against the source, the
        candidate judged against --min-agreement when given, and per prompt the source's answer and each score."""
        min_agreement = opts.min_agreement
        source = results["source"]
        compared = {role: res for role, res in results.items() if role != "source"}
        agreement = compared["candidate"]["agreement"]
        return {
            "prompts": len(source["prompts"]), "tokens": source["tokens"], "positions": source["positions"],
            "agreement": {role: res["agreement"] for role, res in compared.items()},
            "kl": {role: res["kl"] for role, res in compared.items()},
            "min_agreement": min_agreement,
            "pass": None if min_agreement is None else agreement >= min_agreement,
            "per_prompt": [{"prompt": prompt, "source_answer": source["answers"][i],
                            "agreement": {role: res["per_prompt_agreement"][i] for role, res in compared.items()},
                            "kl": {role: res["per_prompt_kl"][i] for role, res in compared.items()}}
                           for i, prompt in enumerate(source["prompts"])],
        }

    @staticmethod
    def rows(report: dict) -> list[tuple[str, list[str]]]:
        """Rows for the model table, beside perplexity: the source is the reference, so its cells are '-'."""
        section = report.get("behaviour")
        if not section:
            return []
        roles = list(report["models"])
        return [(label, [f"{section[key][role]:.4f}" if role in section[key] else "-" for role in roles])
                for label, key in (("behaviour: next-token agreement", "agreement"),
                                   ("behaviour: KL(source‖model), nats", "kl"))]

    @staticmethod
    def vote(section: dict, reference: str, opts: ValidateOptions) -> check.Vote | None:
        if opts.min_agreement is None:
            return None
        return check.Vote(section["pass"], f"behaviour agreement {section['agreement']['candidate']:.4f} "
                                           f"(min {section['min_agreement']:g})",
                          f"And the candidate's greedy next-token agreement with the source on the behaviour prompts "
                          f">= {opts.min_agreement:g}.")

    @staticmethod
    def markdown_lines(report: dict) -> list[str]:
        section = report.get("behaviour")
        if not section:
            return []
        judged = ("not judged (no --min-agreement)" if section["pass"] is None else
                  f"candidate {section['agreement']['candidate']:.4f} vs min {section['min_agreement']:g} -> "
                  + ("PASS" if section["pass"] else "FAIL"))
        return [f"behaviour: {section['prompts']} prompts, the source's first {section['tokens']} greedy tokens "
                f"each ({section['positions']:,} positions up to its stop token), every model teacher-forced on them; "
                f"greedy next-token agreement and mean KL(source || model) per position; {judged}. Per-prompt scores "
                "and the source's answers: report.json.", ""]


def stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the model's generation config's EOS ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = {*(configured if isinstance(configured, list) else [configured]), tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None)


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with the prompts right-aligned, so that every answer starts at the same column."""
    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def next_token_logp(model, ids: torch.Tensor, mask: torch.Tensor, answer: int) -> torch.Tensor:
    """(batch, answer, vocabulary) float32 log-probabilities at the positions that predict the last `answer`
    tokens, on the CPU: one forward pass over prompt + answer, logits only where they are needed."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                   position_ids=positions.to(model.device), use_cache=False, logits_to_keep=answer + 1).logits
    return F.log_softmax(logits[:, :-1].float(), -1).cpu()
