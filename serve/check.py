"""Serve a checkpoint with vLLM and compare it with transformers' generate() of the same folder.

    python -m serve.check CHECKPOINT OUT.json [--max-tokens 16] [--kv-cache-bytes N] [--block-size 32]

One vLLM engine runs every prompt in one batch (different lengths), greedy, with each generated
token's logprob, then the longest prompt once more (its blocks now come from vLLM's prefix cache);
transformers generates each prompt alone. The JSON holds both, the KV-cache blocks vLLM allocated
for the ``--kv-cache-bytes`` budget and the sequences of ``--max-model-len`` tokens they hold at
once, and the layout's KV bytes per token from its arithmetic. One process per checkpoint: vLLM
keeps engine state per process.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# in-process engine (no engine-core subprocess): this script is the whole server
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a land far, far away, there lived a young girl who",
    "def fibonacci(n):",
    "The three most important inventions of the twentieth century were the transistor, the laser and",
    "Water boils at",
    "In 1969, Neil Armstrong and Buzz Aldrin became the first people to walk on the Moon, while Michael "
    "Collins stayed in orbit aboard the command module. The mission, Apollo 11, had launched from",
)


def kv_bytes_from_config_json(folder: Path, bytes_per_element: int) -> int:
    """KV-cache bytes per token from config.json alone: the layout's arithmetic, or a plain Llama's dense cache."""
    from models.kv_layout import LAYOUT_FIELDS, KVLayout, dense_kv_elements_per_token

    config = json.loads((folder / "config.json").read_text())
    layout = KVLayout()
    layout.num_hidden_layers, layout.hidden_size = config["num_hidden_layers"], config["hidden_size"]
    layout.num_key_value_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    layout.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if "kv_layout" not in config:
        return dense_kv_elements_per_token(layout) * bytes_per_element
    layout.attention_bias = config.get("attention_bias", False)
    layout.set_layout(**{name: config[name] for name in LAYOUT_FIELDS if name in config})
    return layout.kv_cache_bytes_per_token(bytes_per_element)


def run_vllm(folder: Path, prompt_ids: list[list[int]], args) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
              kv_cache_memory_bytes=args.kv_cache_bytes, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=0)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    again = llm.generate([{"prompt_token_ids": prompt_ids[longest]}], params, use_tqdm=False)[0]
    cache = llm.llm_engine.vllm_config.cache_config
    generated = [o.outputs[0] for o in outputs]
    return {
        "tokens": [list(g.token_ids) for g in generated],
        "logprobs": [[lp[t].logprob for lp, t in zip(g.logprobs, g.token_ids)] for g in generated],
        "prefix_cached_rerun": {"prompt": longest, "tokens": list(again.outputs[0].token_ids),
                                "cached_prompt_tokens": again.num_cached_tokens},
        "generate_seconds": seconds,
        "num_blocks": cache.num_gpu_blocks,
        "block_size": cache.block_size,
        "max_concurrent_sequences": cache.num_gpu_blocks // -(-args.max_model_len // cache.block_size),
    }


def run_transformers(folder: Path, prompt_ids: list[list[int]], args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=getattr(torch, args.dtype)).eval()
    tokens, logprobs = [], []
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(ids):].tolist()
        tokens.append(new)
        logprobs.append([torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(out.logits, new)])
    return {"tokens": tokens, "logprobs": logprobs}


def compare(vllm: dict, reference: dict) -> dict:
    """Greedy tokens equal per prompt, and the largest logprob difference where they are."""
    same = [a == b for a, b in zip(vllm["tokens"], reference["tokens"])]
    gaps = [abs(x - y) for a, b in zip(vllm["logprobs"], reference["logprobs"]) for x, y in zip(a, b)]
    rerun = vllm["prefix_cached_rerun"]
    return {"tokens_equal": all(same), "prompts_equal": sum(same), "prompts": len(same),
            "max_logprob_abs_diff": max(gaps),
            "prefix_cached_rerun_equal": rerun["tokens"] == reference["tokens"][rerun["prompt"]]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--kv-cache-bytes", type=int, default=64 << 20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-transformers", action="store_true", help="vLLM only (blocks and concurrency)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    result = {"checkpoint": str(args.checkpoint), "prompt_lengths": [len(ids) for ids in prompt_ids],
              "kv_cache_bytes": args.kv_cache_bytes, "max_model_len": args.max_model_len,
              "kv_bytes_per_token": kv_bytes_from_config_json(args.checkpoint, 2 if "16" in args.dtype else 4),
              "vllm": run_vllm(args.checkpoint, prompt_ids, args)}
    if not args.skip_transformers:
        result["transformers"] = run_transformers(args.checkpoint, prompt_ids, args)
        result["comparison"] = compare(result["vllm"], result["transformers"])
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
