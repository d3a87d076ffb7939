"""The uptraining loop: DeepSpeed engine, lm / kd / lm+kd loss, eval, checkpoints, export."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.console import console, progress

from . import checkpoint
from .data import StepSampler
from .engine import ds_config, optimizer_and_schedule, use_bf16
from .metrics import MetricsLog, plot
from .recipe import Recipe


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t / student_logits.shape[1]


def batch_loss(engine, batch: torch.Tensor, recipe: Recipe, teacher) -> torch.Tensor:
    out = engine(batch, labels=batch, use_cache=False)
    if recipe.loss == "lm":
        return out.loss
    with torch.no_grad():
        teacher_logits = teacher(batch, use_cache=False).logits
    kd = distill_loss(out.logits, teacher_logits, recipe.kd_temperature)
    return kd if recipe.loss == "kd" else (1 - recipe.kd_weight) * out.loss + recipe.kd_weight * kd


@torch.no_grad()
def eval_ppl(engine, sequences: torch.Tensor, micro_batch: int) -> float:
    engine.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch].to(engine.device)
        loss = engine(batch, labels=batch, use_cache=False).loss
        n = batch.numel() - batch.shape[0]
        total, count = total + loss.float().item() * n, count + n
    engine.train()
    return math.exp(total / count)


def train(model, tokenizer, teacher, train_seqs, eval_seqs, recipe: Recipe, total_steps: int, run_dir: Path,
          rank: int, world_size: int, resume: bool) -> Path:
    import deepspeed

    if recipe.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, schedule = optimizer_and_schedule(model, recipe, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config(recipe, world_size))
    if teacher is not None:
        teacher.to(engine.device)
        if use_bf16(recipe):
            teacher.to(torch.bfloat16)
    ckpt_dir = run_dir / "checkpoints"
    start = 0
    if resume:
        state = checkpoint.resume(engine, ckpt_dir)
        start = state["step"] if state else 0
        if rank == 0:
            console.print(f"resumed at step {start}" if state else "no checkpoint found: starting from step 0")
    log = MetricsLog(run_dir / "metrics.jsonl", start) if rank == 0 else None
    sampler = StepSampler(train_seqs, recipe.micro_batch, recipe.grad_accum, world_size, recipe.seed)
    tokens_per_step = sampler.per_step * recipe.seq_len

    with progress() as bar:
        task = bar.add_task("uptrain", total=total_steps, completed=start)
        for step in range(start, total_steps):
            tic, losses = time.perf_counter(), []
            for micro in range(recipe.grad_accum):
                batch = sampler.micro_batch_at(step, micro, rank).to(engine.device)
                loss = batch_loss(engine, batch, recipe, teacher)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            done = step + 1
            # on the engine's device: nccl reduces GPU tensors only
            mean_loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64, device=engine.device)
            torch.distributed.all_reduce(mean_loss)  # every rank's micro-batches count in the logged loss
            record = {"step": done, "loss": mean_loss.item() / world_size, "lr": schedule.get_last_lr()[-1],
                      "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens": done * tokens_per_step,
                      "tokens_per_s": tokens_per_step / (time.perf_counter() - tic)}
            if done % recipe.eval_every == 0 or done == total_steps:
                record["eval_ppl"] = eval_ppl(engine, eval_seqs, recipe.micro_batch)
            if log and (done % recipe.log_every == 0 or "eval_ppl" in record):
                log.write(record)
            bar.update(task, advance=1, description=f"uptrain loss {record['loss']:.3f} {record['tokens_per_s']:.0f} tok/s")
            if done % recipe.save_every == 0 and done < total_steps:
                checkpoint.save(engine, ckpt_dir, done, recipe.keep_last, {"tokens": record["tokens"]})

    final = run_dir / "final"
    checkpoint.export(engine, engine.module, tokenizer, final, recipe.zero_stage)
    if log:
        plot(log.records(), run_dir / "metrics.png", run_dir.name)
    return final
