"""Decode benchmark: KV bytes per token, decode speed and memory per layout, against the source.

Every layout is built from the source config with the same weights where shapes allow (the
values do not change speed or memory), prefilled with a random prompt in chunks (so transient
activations stay small next to the cache) and decoded greedily. Ratios are against the source
measured in the same run. The decode loop and its timing (the median step) are validate's
(validate/kvcache.py), so the two report the same speed for a model. The "fits" numbers are the
user-facing win of a smaller cache: how many cached tokens a fixed KV budget holds (arithmetic),
and on a GPU the largest batch at a fixed context whose whole run (weights, cache, activations)
stays under a memory budget (measured), with the decode throughput at that batch.

    python bench/decode.py                                   # CPU: SmolLM2-135M, contexts 1k and 4k
    python bench/decode.py --model random --device cuda --dtype bfloat16 --contexts 1024,4096,16384
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.machine import machine_info
from bench.shapes import random_source
from bench.variants import split_variants, with_variants
from common.sources import load_causal_lm
from models import LAYOUTS, SharedKVForCausalLM
from models.source_layout import shared_kv_config
from validate.kvcache import decode, kv_bytes_per_token, kv_cache_bytes


def layout_model(source, layout: str):
    """'source' is the model as loaded; 'sharing_off' the same weights in this project's model code
    with every layer storing K/V, the baseline that isolates what a layout itself costs; a layout
    may carry variant suffixes (bench/variants.py)."""
    if layout == "source":
        return source
    base, variants = split_variants(layout)
    if base == "sharing_off":
        config = shared_kv_config(source.config, "fusedkv", num_storage_layers=source.config.num_hidden_layers)
    else:
        config = shared_kv_config(source.config, base)
    model = SharedKVForCausalLM(config).to(dtype=source.dtype, device=source.device).eval()
    model.load_state_dict(
        {k: v for k, v in source.state_dict().items() if model.state_dict().get(k, v).shape == v.shape},
        strict=False,
    )
    return with_variants(model, variants)


def decode_run(model, context: int, new_tokens: int, device: str, batch: int = 1, chunk: int = 512) -> dict:
    """Chunked prefill of ``batch`` random prompts and greedy decoding (validate's decode loop):
    speeds, the cache's bytes, and on a GPU the run's peak memory."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = decode(model, ids, new_tokens, chunk=chunk)
    cache_bytes = kv_cache_bytes(run.cache)
    result = {
        "context": context,
        "batch": batch,
        "prefill_tokens_per_s": batch * context / run.prefill_s,
        "decode_tokens_per_s": batch / run.step_median_s,
        "decode_ms_per_step": 1000 * run.step_median_s,
        "kv_cache_bytes": cache_bytes,
        "kv_bytes_per_token_measured": cache_bytes / (batch * run.cache.get_seq_length()),
    }
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return result


def largest_batch(model, context: int, budget_bytes: float, new_tokens: int) -> dict:
    """The largest batch whose run at ``context`` peaks under ``budget_bytes`` of GPU memory (measured)."""
    def fits(batch: int):
        run = decode_run(model, context, new_tokens, "cuda", batch=batch)
        return run if run["peak_memory_bytes"] <= budget_bytes else None

    low, best, high = 0, None, 1
    while (run := fits(high)) is not None:  # doubling, then bisection between the last fit and the first miss
        low, best, high = high, run, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        if (run := fits(mid)) is not None:
            low, best = mid, run
        else:
            high = mid
    return best or {"batch": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="source checkpoint or .gguf (default: embedded SmolLM2-135M); "
                             "'random': SmolLM2-135M's shape with random weights")
    parser.add_argument("--layouts", default="source,sharing_off," + ",".join(LAYOUTS))
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--budget-gib", type=float, default=1.0, help="KV-cache budget for the arithmetic 'fits'")
    parser.add_argument("--fit-context", type=int, default=4096, help="context of the measured batch search (GPU)")
    parser.add_argument("--fit-memory-gib", type=float, default=8.0,
                        help="whole-run GPU memory budget of the measured batch search (0 = skip)")
    parser.add_argument("--cudnn-attention", action="store_true", help="allow torch's cuDNN SDPA backend (GPU)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/decode_<device>.json)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    if args.device == "cuda" and not args.cudnn_attention:
        # cuDNN's SDPA backend re-plans on shapes it has not seen, a CPU cost per call that would
        # swamp the layouts' differences
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = getattr(torch, args.dtype)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.model == "random":
        source = random_source(max(contexts + [args.fit_context]) + 2 * args.new_tokens, dtype, args.device)
    else:
        source = load_causal_lm(args.model, dtype=dtype, attn_implementation="sdpa").to(args.device)
    budget = args.budget_gib * 2**30
    results = {}
    for layout in args.layouts.split(","):
        model = layout_model(source, layout)
        arithmetic = kv_bytes_per_token(model.config, dtype.itemsize)
        decode_run(model, 64, 4, args.device)  # warm-up
        runs = [decode_run(model, c, args.new_tokens, args.device) for c in contexts]
        results[layout] = {
            "kv_bytes_per_token_arithmetic": arithmetic,
            "runs": runs,
            "max_cached_tokens_in_budget": int(budget // arithmetic),
            "max_batch_at_4k_in_budget": int(budget // (arithmetic * 4096)),
        }
        line = ", ".join(f"{r['context']}: {r['decode_tokens_per_s']:.1f} tok/s" for r in runs)
        if args.device == "cuda" and args.fit_memory_gib > 0:
            fit = largest_batch(model, args.fit_context, args.fit_memory_gib * 2**30, args.new_tokens)
            results[layout]["largest_batch_in_memory"] = fit
            line += f"; largest batch at {args.fit_context}: {fit['batch']}"
        print(f"{layout:>13}: {arithmetic} B/token, {line}", flush=True)
        del model
    base = results.get("source")
    if base:
        for res in results.values():
            res["kv_bytes_ratio_vs_source"] = res["kv_bytes_per_token_arithmetic"] / base["kv_bytes_per_token_arithmetic"]
            res["decode_speed_ratio_vs_source"] = [
                r["decode_tokens_per_s"] / b["decode_tokens_per_s"] for r, b in zip(res["runs"], base["runs"])
            ]
            if "largest_batch_in_memory" in res and base["largest_batch_in_memory"]["batch"]:
                fit, base_fit = res["largest_batch_in_memory"], base["largest_batch_in_memory"]
                res["largest_batch_ratio_vs_source"] = fit["batch"] / base_fit["batch"]
                res["throughput_at_largest_batch_vs_source"] = fit["decode_tokens_per_s"] / base_fit["decode_tokens_per_s"]
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"decode_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "decode", "machine": machine_info(), "settings": vars(args), "results": results}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
