"""The uptraining loop: DeepSpeed engine, lm / kd / lm+kd loss, eval, checkpoints, export."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from common.console import console, progress
from common.errors import UserError
from common.outputs import user_os_errors

from . import blend as blending, checkpoint, fast_path
from .data import TrainData
from .engine import ds_config, optimizer_and_schedule, use_bf16
from .loss import chunked_losses, final_hidden_states
from .metrics import MetricsLog, plot
from .recipe import Recipe

MAX_LOG_PPL = 700.0  # math.exp overflows a float just above 709


def batch_loss(engine, batch: torch.Tensor, recipe: Recipe, teacher) -> torch.Tensor:
    """The recipe's loss, the output layer and loss a chunk of tokens at a time (uptrain/loss.py)."""
    hidden = final_hidden_states(engine, batch)
    teacher_hidden = None
    if teacher is not None:
        with torch.no_grad():
            teacher_hidden = final_hidden_states(teacher, batch)
    lm, kd = chunked_losses(hidden, engine.module.get_output_embeddings(), batch, teacher_hidden,
                            teacher.get_output_embeddings() if teacher is not None else None, recipe.kd_temperature)
    if recipe.loss == "lm":
        return lm
    return kd if recipe.loss == "kd" else (1 - recipe.kd_weight) * lm + recipe.kd_weight * kd


class Diverged(UserError):
    """The run stopped at a step whose loss, gradients or weights are not finite."""


@torch.no_grad()
def eval_ppl(engine, sequences: torch.Tensor, micro_batch: int, zero3: bool) -> float:
    """Held-out perplexity; inf once the mean loss is too large for exp (a diverged model). engine may
    be a bare model (an export reloaded: bench/device_check.py)."""
    engine.eval()
    total, count = 0.0, 0
    head = getattr(engine, "module", engine).get_output_embeddings()
    for start in range(0, len(sequences), micro_batch):
        batch = sequences[start : start + micro_batch].to(engine.device)
        loss, _ = chunked_losses(final_hidden_states(engine, batch), head, batch)
        n = batch.numel() - batch.shape[0]
        total, count = total + loss.float().item() * n, count + n
    if zero3:
        engine.empty_partition_cache()  # no backward follows to consume what the eval prefetched
    engine.train()
    mean = total / count
    return math.exp(mean) if mean < MAX_LOG_PPL else math.inf


def weights_finite(engine) -> bool:
    """No NaN or inf in any rank's share of the weights (ZeRO-3: each rank's partition)."""
    local = all(torch.isfinite(getattr(p, "ds_tensor", p)).all() for p in engine.module.parameters())
    flag = torch.tensor(float(local), device=engine.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def unclipped_grad_norm(engine) -> float:
    """The gradient norm before clipping, read between backward and step: ZeRO stage 0 clips without
    keeping it (its get_global_grad_norm() is None). The gradients are whole and already reduced."""
    return torch.nn.utils.get_total_norm([p.grad for p in engine.module.parameters() if p.grad is not None]).item()


def train(model, tokenizer, teacher, data: TrainData, recipe: Recipe, total_steps: int, run_dir: Path,
          rank: int, world_size: int, resume: bool, resume_from: str | None, export_dtype: torch.dtype,
          blend: blending.BlendSchedule | None = None) -> Path:
    import deepspeed

    if recipe.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    kernels = fast_path.enable(model, recipe.kernels, recipe.zero_stage, recipe.loss,
                               torch.bfloat16 if use_bf16(recipe) else torch.float32)
    if kernels and rank == 0:
        console.print(kernels)
    optimizer, schedule = optimizer_and_schedule(model, recipe, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config(recipe, world_size))
    zero3 = recipe.zero_stage == 3
    if world_size == 1 and recipe.zero_stage == 0:
        # nothing to reduce, yet DeepSpeed would flatten every gradient into a bucket copy (ZeRO 1-3 need
        # their reduction path even alone: it fills the partitions' gradients)
        engine.enable_backward_allreduce = False
    if teacher is not None:
        teacher.to(engine.device)
        if use_bf16(recipe):
            teacher.to(torch.bfloat16)
    ckpt_dir = run_dir / "checkpoints"
    start = 0
    if resume or resume_from:
        state = checkpoint.resume(engine, ckpt_dir, resume_from)
        start = state["step"] if state else 0
        if rank == 0:
            console.print(f"resumed at step {start}" if state else "no checkpoint found: starting from step 0")
    log = MetricsLog(run_dir / "metrics.jsonl", start) if rank == 0 else None
    sampler = data.sampler(recipe, world_size)
    tokens_per_step = sampler.per_step * recipe.seq_len
    last_saved = f"step{start}" if start else None

    def stop(step: int, what: str) -> Diverged:
        kept = f"its last good checkpoint is {ckpt_dir / last_saved}" if last_saved else "no checkpoint was saved"
        return Diverged(f"step {step}: {what}; the run stopped without exporting ({kept}). "
                        f"Lower lr (now {recipe.lr:g}) and start a new run")

    def at_step(step: int) -> None:  # the blend's t follows the step the weights are at
        if blend is not None:
            blend.step = step

    if start == 0:  # the step-0 point: what the conversion alone gives (with a blend: the source)
        at_step(0)
        initial = eval_ppl(engine, data.eval_sequences, recipe.micro_batch, zero3)
        if log:
            log.write({"step": 0, "tokens": 0, "eval_ppl": initial})
    skipped_in_a_row = 0
    with progress() as bar:
        task = bar.add_task("uptrain", total=total_steps, completed=start)
        for step in range(start, total_steps):
            tic, losses, skipped_before, norm = time.perf_counter(), [], engine.skipped_steps, None
            at_step(step)
            for micro in range(recipe.grad_accum):
                batch = data.batch(sampler.micro_batch_at(step, micro, rank)).to(engine.device)
                loss = batch_loss(engine, batch, recipe, teacher)
                engine.backward(loss)
                if recipe.zero_stage == 0 and micro == recipe.grad_accum - 1:
                    norm = unclipped_grad_norm(engine)
                engine.step()
                losses.append(loss.item())
            done = step + 1
            # on the engine's device: nccl reduces GPU tensors only
            mean_loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64, device=engine.device)
            torch.distributed.all_reduce(mean_loss)  # every rank's micro-batches count in the logged loss
            skipped = engine.skipped_steps - skipped_before
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            norm = norm if norm is not None else engine.get_global_grad_norm()
            record = {"step": done, "loss": mean_loss.item() / world_size, "lr": schedule.get_last_lr()[-1],
                      "grad_norm": float(norm) if norm is not None else None, "tokens": done * tokens_per_step,
                      "tokens_per_s": tokens_per_step / (time.perf_counter() - tic)}
            if torch.cuda.is_available():
                record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if skipped:
                record["skipped"] = engine.skipped_steps
            if not math.isfinite(record["loss"]):
                raise stop(done, f"the training loss is {record['loss']}")
            if not skipped and norm is not None and not math.isfinite(record["grad_norm"]):
                raise stop(done, f"the gradient norm is {record['grad_norm']}")
            if skipped_in_a_row > recipe.max_skipped_steps:
                raise stop(done, f"the optimizer skipped {skipped_in_a_row} steps in a row for gradient overflow "
                                 f"(max_skipped_steps {recipe.max_skipped_steps})")
            if blend is not None and step < blend.steps:
                record["blend_t"] = round(blend.t, 4)
            if done % recipe.eval_every == 0 or done == total_steps:
                at_step(done)
                record["eval_ppl"] = eval_ppl(engine, data.eval_sequences, recipe.micro_batch, zero3)
            if log and (done % recipe.log_every == 0 or "eval_ppl" in record or skipped):
                log.write(record)
            if not math.isfinite(record.get("eval_ppl", 0.0)):
                raise stop(done, "the held-out perplexity overflowed (the model diverged)")
            bar.update(task, advance=1, description=f"uptrain loss {record['loss']:.3f} {record['tokens_per_s']:.0f} tok/s")
            if done in recipe.export_at:  # before the checkpoint: a run killed between the two exports it again
                checkpoint.export(engine, engine.module, tokenizer, run_dir / "exports" / f"step{done}", zero3,
                                  export_dtype, recipe.export_max_shard_size, blending.layout_parameters(engine.module))
            # the last step too: a failed export (a full disk) then loses nothing, and --resume exports again
            if done % recipe.save_every == 0 or done == total_steps:
                if not weights_finite(engine):
                    raise stop(done, "the weights hold NaN or inf")
                checkpoint.save(engine, ckpt_dir, done, recipe.keep_last,
                                {"tokens": record["tokens"], "world_size": world_size})
                last_saved = f"step{done}"

    final = run_dir / "final"
    blending.detach(engine.module)  # t is 1 by now: the source K/V were not used since blend.steps
    tic = time.perf_counter()
    checkpoint.export(engine, engine.module, tokenizer, final, zero3, export_dtype, recipe.export_max_shard_size)
    if log:
        seconds = time.perf_counter() - tic
        with user_os_errors(run_dir):  # final/ is whole already: a full disk here is one line, no traceback
            (run_dir / "export.json").write_text(json.dumps({"seconds": round(seconds, 3), "dtype": str(export_dtype)}) + "\n")
            console.print(f"exported in {seconds:.1f} s")
            plot(log.records(), run_dir / "metrics.png", run_dir.name)
    return final
