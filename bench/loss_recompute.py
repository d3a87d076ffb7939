"""What recomputing the output layer's chunks costs (uptrain/loss.py): training tokens/s of a step
(student forward, chunked loss, backward) with and without the recompute, for lm and lm+kd.

Runs on a committed mini source (the student is the source itself: the output layer and loss are the
same for every layout) on one thread, 32 x 256 tokens a step as the parity study trains it. Writes
bench/results/loss_recompute_cpu.json; the load average is recorded beside it, since other work on
the machine slows both settings.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.machine import machine_info
from uptrain.loss import Teacher, chunked_losses, final_hidden_states

ROOT = Path(__file__).resolve().parent.parent


def tokens_per_s(student, teacher, batch: torch.Tensor, recompute: bool, steps: int) -> float:
    """Median tokens/s over `steps` timed steps after one untimed one."""
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        distill = Teacher.on(teacher, batch, 2.0) if teacher is not None else None
        lm, kd = chunked_losses(final_hidden_states(student, batch), student.get_output_embeddings(), batch, distill,
                                recompute=recompute)
        (lm if kd is None else (lm + kd) / 2).backward()
        student.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return batch.numel() / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(ROOT / "data" / "mini-sources" / "mha"))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=2, help="the settings alternate this many times")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loss_recompute_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.float32).eval()
    batch = torch.randint(0, student.config.vocab_size, (32, 256))
    results = {}
    for loss in ("lm", "lm+kd"):
        rates = {True: [], False: []}
        for _ in range(args.rounds):  # alternate, so that a change in the machine's load touches both
            for recompute in rates:
                rates[recompute].append(tokens_per_s(student, teacher if loss == "lm+kd" else None, batch,
                                                     recompute, args.steps))
        recomputed, kept = statistics.median(rates[True]), statistics.median(rates[False])
        results[loss] = {"tokens_per_s_recompute": round(recomputed), "tokens_per_s_keep": round(kept),
                         "recompute_cost": round(1 - recomputed / kept, 3)}
        print(f"{loss}: {recomputed:,.0f} tokens/s recomputed, {kept:,.0f} kept", flush=True)
    payload = {"benchmark": "loss_recompute", "machine": machine_info(), "load_average": os.getloadavg(),
               "source": os.path.relpath(args.source, ROOT), "tokens_per_step": batch.numel(), "threads": 1,
               "results": results}
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
