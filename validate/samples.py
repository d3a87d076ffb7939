"""What a model says: greedy answers to a few fixed prompts, so the demo shows behaviour next to
perplexities (a perplexity of 297 means little to a newcomer; "Paris" against word salad does).

The prompts go through the tokenizer's chat template when it has one (the embedded model is an
instruct model and answers questions only in its chat format), else as plain text.
"""
from __future__ import annotations

from pathlib import Path

PROMPTS = (
    "What is the capital of France?",
    "Name the three primary colors.",
    "Write one sentence about the sea.",
)


def prompt_ids(tokenizer, prompt: str) -> dict:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    return tokenizer(prompt, return_tensors="pt")


def greedy_answers(model, tokenizer, prompts, new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation, whitespace folded to single spaces (one line each)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for prompt in prompts:
        inputs = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(" ".join(text.split()))
    return answers


def model_behaviour(path: Path, new_tokens: int, token_sets=None) -> dict:
    """Greedy answers of the model at path and, given token sets [(name, ids)], its perplexity on each."""
    from common.sources import load_causal_lm, load_tokenizer

    from .perplexity import score_windows

    model, tokenizer = load_causal_lm(path, attn_implementation="sdpa"), load_tokenizer(path)
    result = {"answers": greedy_answers(model, tokenizer, PROMPTS, new_tokens)}
    if token_sets is not None:
        result["perplexity"] = {name: score_windows(model, ids, 512, 256, f"ppl {name}").perplexity
                                for name, ids in token_sets}
    return result
