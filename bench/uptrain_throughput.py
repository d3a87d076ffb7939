"""Uptraining throughput and peak memory of each layout against the unconverted model.

Each layout trains under the same DeepSpeed config (ZeRO-2, AdamW, the same batch of random
tokens) through uptrain's own engine and step (``uptrain.train.Uptraining``: its loss, optimizer
and, on a GPU, its fast path, uptrain/fast_path.py) in a fresh process, so peak RSS (CPU) or peak allocated memory (GPU) is its
own. The model is a Llama built from a config (bench/shapes.py; default SmolLM2-135M's shape) on
the device it trains on, so no weights travel. The `plain` row is the unconverted model in a plain
transformers loop (`model(batch, labels=batch)`, fused AdamW, no DeepSpeed): against `source`, what
uptrain's own machinery costs a step (`--shape mini-mha`, the parity study's source, shows it best).

    python bench/uptrain_throughput.py                       # CPU, fp32
    python bench/uptrain_throughput.py --device cuda --micro-batch 16 --seq-len 2048   # GPU, bf16, MFU
    python bench/uptrain_throughput.py --device cuda --shape smollm2-1.7b --micro-batch 4 --seq-len 2048
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_layout(layout: str, args) -> dict:
    import torch

    from bench.shapes import SHAPES, peak_flops
    from bench.variants import split_variants, with_variants
    from models import SharedKVForCausalLM
    from models.source_layout import shared_kv_config
    from uptrain.engine import init_distributed
    from uptrain.recipe import Recipe
    from uptrain.train import Models, Uptraining

    _, world = init_distributed()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    source_config = LlamaConfig(**SHAPES[args.shape])
    source_config._attn_implementation = "sdpa"
    recipe = Recipe(micro_batch=args.micro_batch, seq_len=args.seq_len, zero_stage=2, kernels=args.kernels,
                    precision="bf16" if args.device == "cuda" else "fp32", activation_checkpointing=False)
    with torch.device(args.device):  # a 1.7B model initialised on the host takes longer than its benchmark
        if layout in ("source", "plain"):
            model = LlamaForCausalLM(source_config)
        else:
            base, variants = split_variants(layout)
            model = with_variants(SharedKVForCausalLM(shared_kv_config(source_config, base)), variants)
    batch = torch.randint(0, source_config.vocab_size, (args.micro_batch, args.seq_len), device=args.device)
    if layout == "plain":
        step, kernels = plain_step(model, recipe, batch), "plain transformers loop"
    else:
        uptraining = Uptraining(recipe, folder=None, world_size=world)  # uptrain's own engine and step: no run folder
        uptraining.setup(Models(model), data=None, total_steps=args.steps + 2)
        step, kernels = (lambda: uptraining.train_step([batch])), uptraining.kernels or "plain PyTorch"
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    tokens_per_s = args.steps * batch.numel() / seconds
    result = {"layout": layout, "parameters": params, "tokens_per_s": tokens_per_s,
              "flops_per_s": 6 * params * tokens_per_s, "kernels": kernels}
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        peak = peak_flops(torch.cuda.get_device_name(0))
        if peak:  # 6*N*T counts the matmuls only: attention's own FLOPs make the true MFU a bit higher
            result["mfu"] = result["flops_per_s"] / peak
    return result


def plain_step(model, recipe, batch):
    """One step of the reference loop on batch: the whole batch's loss through transformers, AdamW fused
    where uptrain's optimizer is (uptrain/fast_path.py), so the two rows differ only in the step."""
    import torch

    from uptrain.fast_path import fused_adamw

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=tuple(recipe.betas),
                                  weight_decay=recipe.weight_decay, fused=fused_adamw(str(batch.device)))

    def step():
        model(batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    from bench.shapes import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="source,fusedkv,fusedkv_lite,skipv1")
    parser.add_argument("--shape", default="smollm2-135m", choices=SHAPES, help="model shape (bench/shapes.py)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--kernels", default="auto", choices=["auto", "plain"],
                        help="auto: uptrain's GPU fast path (Liger kernels where they work); plain: PyTorch's")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single layout in this process
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(one_layout(args.one, args)))
        return 0
    from bench.machine import machine_info

    results, failed = {}, []
    for layout in args.layouts.split(","):
        cmd = [sys.executable, __file__, "--one", layout, "--device", args.device, "--steps", str(args.steps),
               "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--shape", args.shape,
               "--kernels", args.kernels]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:  # the other layouts still run and are written
            results[layout] = {"layout": layout, "error": proc.stderr[-3000:]}
            failed.append(layout)
            print(f"{layout:>13}: failed\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results[layout] = json.loads(proc.stdout.strip().splitlines()[-1])
        mfu = f", MFU {results[layout]['mfu']:.3f}" if "mfu" in results[layout] else ""
        print(f"{layout:>13}: {results[layout]['tokens_per_s']:.1f} tokens/s{mfu} ({results[layout]['kernels']})",
              flush=True)
    base = results.get("source", {}).get("tokens_per_s")
    for res in results.values():
        if base and "tokens_per_s" in res:
            res["tokens_per_s_vs_source"] = res["tokens_per_s"] / base
    out = Path(args.out or ROOT / "bench" / "results" / f"uptrain_{args.device}.json")
    payload = {"benchmark": "uptrain_throughput", "machine": machine_info(), "settings": vars(args),
               "model": f"{args.shape} shape, random init", "zero_stage": 2, "results": results}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
