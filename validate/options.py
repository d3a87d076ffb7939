"""What a validation is asked to do: `ValidateOptions`, declared once for the CLI, `--config` files,
the demo and the benchmarks (common/options.py loads and checks it)."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError
from common.options import SEEDS, Range, option

DEFAULT_MAX_TOKENS = 16384
DEFAULT_CONTEXT = 512  # and a stride of half the context
DEFAULT_DECODE = (128, 512)


@dataclass
class ValidateOptions:
    candidate: str | None = option(None, "the converted checkpoint to judge: a folder, a .gguf, or 'default'")
    source: str | None = option(None, "the unconverted source checkpoint or .gguf (none: the embedded SmolLM2-135M)")
    control: str | None = option(None, "the source uptrained with the candidate's recipe (a checkpoint folder); "
                                       "becomes the verdict's reference")
    data: tuple[str, ...] | None = option(None, "held-out texts: .txt, .jsonl or datasets datasets "
                                                "(none: WikiText-2 test + Python docs)")
    max_tokens: int = option(DEFAULT_MAX_TOKENS, "score the first N tokens of each text, 0 = all", within=Range(at_least=0))
    context: int | None = option(None, f"sliding-window length in tokens (none: {DEFAULT_CONTEXT}, or the models' "
                                       "max_position_embeddings when fewer)", within=Range(at_least=2))
    stride: int | None = option(None, "sliding-window step in tokens, at most context (none: context / 2)", within=Range(at_least=1))
    tolerance: float = option(0.01, "pass when candidate ppl <= (1 + tolerance) x reference ppl", within=Range(at_least=0))
    bootstrap: int = option(1000, "bootstrap resamples for the 95% CI", within=Range(at_least=1, at_most=100_000))
    decode_lengths: tuple[int, ...] | None = option(None, "context lengths for KV bytes and decode tokens/s, "
                                                          f"comma-separated (none: those of {DEFAULT_DECODE} that fit "
                                                          "the models, else the longest that fits)", within=Range(at_least=1))
    decode_new_tokens: int = option(16, "timed greedy decode steps", within=Range(at_least=1))
    seed: int = option(0, "seed for the bootstrap and the decode prompts", within=Range(at_least=0, below=SEEDS))
    out: str | None = option(None, "report folder (none: runs/validate-<candidate name>)")
    tasks: str | None = option(None, "lm-evaluation-harness tasks or groups, comma-separated, e.g. hellaswag,arc_easy "
                                     "(their data from the hub or the local datasets cache)")
    tasks_path: str | None = option(None, "a folder of extra lm-eval task YAMLs (include_path)")
    tasks_limit: int = option(0, "score only the first N examples of each task, 0 = all", within=Range(at_least=0))
    tasks_batch_size: int = option(8, "lm-eval batch size", within=Range(at_least=1))
    max_accuracy_drop: float | None = option(None, "also FAIL when the candidate's accuracy on any task is more than "
                                                   "this below the reference's, e.g. 0.01 = one point "
                                                   "(none: tasks are reported, not judged)", within=Range(at_least=0, at_most=1))
    passkey: bool = option(False, "also run the passkey retrieval test (implied by the passkey_* options)")
    passkey_lengths: str | None = option(None, "passkey context lengths in tokens, comma-separated (none: those "
                                               "of 1024,2048,4096 that fit the models, else their "
                                               "max_position_embeddings)")
    passkey_depths: str | None = option(None, "passkey key depths, fractions of the filler before the key, "
                                              "comma-separated (none: 0.1,0.5,0.9)")
    passkey_trials: int | None = option(None, "passkey keys per length and depth (none: 3)", within=Range(at_least=1))
    behaviour: bool = option(False, "also run the behaviour check: the source answers short prompts greedily and "
                                    "every other model is scored on its answers (greedy next-token agreement, "
                                    "KL(source||model)); implied by the behaviour_* options and min_agreement")
    behaviour_prompts: str | None = option(None, "behaviour prompts: a .txt file, one per line, or a .jsonl file "
                                                 "of {\"prompt\": ...} (none: the 120 shipped in data/behaviour)")
    behaviour_tokens: int | None = option(None, "greedy source tokens scored per behaviour prompt (none: 32)", within=Range(at_least=1))
    min_agreement: float | None = option(None, "also FAIL when the candidate's greedy next-token agreement with "
                                               "the source on the behaviour prompts is below this fraction, e.g. 0.9 "
                                               "(none: reported, not judged)", within=Range(at_least=0, at_most=1))

    def check(self) -> None:
        """Rules between options, and the passkey and behaviour values (cheap: no model, no task index)."""
        from . import behaviour, passkey

        if not self.candidate:
            raise UserError("give the checkpoint to judge: --candidate PATH")
        if self.context is not None and self.stride is not None and self.stride > self.context:
            raise UserError(f"--stride {self.stride} must be at most --context {self.context}")
        passkey.settings(self)
        behaviour.settings(self)


FLAGS = tuple(ValidateOptions.__dataclass_fields__)
