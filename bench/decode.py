"""Decode benchmark: KV bytes per token, decode speed and memory per layout, against the source.

Every layout is built from the source config with the same weights where shapes allow (the
values do not change speed or memory), decoded greedily after a random prompt of each context
length. Ratios are against the source measured in the same run. The "fits" columns turn the
measured bytes per token into the user-facing win: how many cached tokens (or how large a batch
at a fixed context) a fixed KV-memory budget holds.

    python bench/decode.py                       # CPU: SmolLM2-135M, contexts 1k and 4k
    python bench/decode.py --device cuda --dtype bfloat16 --contexts 1024,4096,16384
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import machine_info  # noqa: E402
from common.sources import load_causal_lm  # noqa: E402
from models import LAYOUTS, SharedKVConfig, SharedKVForCausalLM, kv_cache_bytes  # noqa: E402


def layout_model(source, layout: str):
    if layout == "source":
        return source
    config = SharedKVConfig.from_source(source.config, layout)
    model = SharedKVForCausalLM(config).to(dtype=source.dtype, device=source.device).eval()
    model.load_state_dict(
        {k: v for k, v in source.state_dict().items() if model.state_dict().get(k, v).shape == v.shape},
        strict=False,
    )
    return model


@torch.inference_mode()
def decode_run(model, context: int, new_tokens: int, device: str) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync()
    prefill_s = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    sync()
    decode_s = time.perf_counter() - start
    cached = context + new_tokens
    result = {
        "context": context,
        "prefill_tokens_per_s": context / prefill_s,
        "decode_tokens_per_s": new_tokens / decode_s,
        "kv_cache_bytes": kv_cache_bytes(cache),
        "kv_bytes_per_token_measured": kv_cache_bytes(cache) / cached,
    }
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="source checkpoint or .gguf (default: embedded SmolLM2-135M)")
    parser.add_argument("--layouts", default="source," + ",".join(LAYOUTS))
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--budget-gib", type=float, default=1.0, help="KV-cache memory budget for the 'fits' columns")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/decode_<device>.json)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    source = load_causal_lm(args.model, dtype=dtype, attn_implementation="sdpa").to(args.device)
    contexts = [int(c) for c in args.contexts.split(",")]
    budget = args.budget_gib * 2**30
    results = {}
    for layout in args.layouts.split(","):
        model = layout_model(source, layout)
        config = model.config
        bytes_el = torch.finfo(dtype).bits // 8
        if layout == "source":
            arithmetic = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * bytes_el
        else:
            arithmetic = config.kv_cache_bytes_per_token(bytes_el)
        decode_run(model, 64, 4, args.device)  # warm-up
        runs = [decode_run(model, c, args.new_tokens, args.device) for c in contexts]
        results[layout] = {
            "kv_bytes_per_token_arithmetic": arithmetic,
            "runs": runs,
            "max_cached_tokens_in_budget": int(budget // arithmetic),
            "max_batch_at_4k_in_budget": int(budget // (arithmetic * 4096)),
        }
        print(f"{layout:>13}: {arithmetic} B/token, "
              + ", ".join(f"{r['context']}: {r['decode_tokens_per_s']:.1f} tok/s" for r in runs), flush=True)
        del model
    base = results.get("source")
    if base:
        for layout, res in results.items():
            res["kv_bytes_ratio_vs_source"] = res["kv_bytes_per_token_arithmetic"] / base["kv_bytes_per_token_arithmetic"]
            res["decode_speed_ratio_vs_source"] = [
                r["decode_tokens_per_s"] / b["decode_tokens_per_s"] for r, b in zip(res["runs"], base["runs"])
            ]
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"decode_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "decode", "machine": machine_info(), "settings": vars(args), "results": results}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
