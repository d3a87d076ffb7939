"""Uptraining as one object, in torchtune's manner: ``setup`` builds the DeepSpeed engine and resumes,
``train_step`` is one optimizer step, ``evaluate`` the held-out perplexity, ``save_checkpoint`` and
``export`` write the run folder, and ``train`` is the loop with its policies (divergence, evals,
checkpoints, mid-run exports) on top. The loss is lm, kd or lm+kd (uptrain/loss.py)."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from checkpoint_io.run_folder import RunFolder
from common.console import console, progress
from common.errors import UserError
from common.outputs import user_os_errors

from . import blend as blending, checkpoint, fast_path
from .data import TrainData
from .engine import ds_config, optimizer_and_schedule, use_bf16
from .loss import Teacher, chunked_losses, final_hidden_states, hidden_state_loss, hidden_states
from .metrics import MetricsLog, plot
from .recipe import Recipe

MAX_LOG_PPL = 700.0  # math.exp overflows a float just above 709


def batch_loss(engine, batch: torch.Tensor, recipe: Recipe, teacher, progress: float = 0.0) -> torch.Tensor:
    """The recipe's loss, the output layer and loss a chunk of tokens at a time (uptrain/loss.py);
    `progress` (step / total steps) moves lm+kd's weight from kd_weight towards kd_weight_end; with a
    teacher, kd_hidden_weight adds the per-layer distance to its hidden states (loss.hidden_state_loss)."""
    distill = (Teacher.on(teacher, batch, recipe.kd_temperature, every_layer=bool(recipe.kd_hidden_weight))
               if teacher is not None else None)
    states = hidden_states(engine, batch)
    lm, kd = chunked_losses(states[-1], engine.module.get_output_embeddings(), batch, distill,
                            recompute=recipe.activation_checkpointing)
    if recipe.loss == "lm":
        return lm
    end = recipe.kd_weight if recipe.kd_weight_end is None else recipe.kd_weight_end
    weight = recipe.kd_weight + (end - recipe.kd_weight) * progress
    loss = kd if recipe.loss == "kd" else (1 - weight) * lm + weight * kd
    if recipe.kd_hidden_weight:
        loss = loss + recipe.kd_hidden_weight * hidden_state_loss(states, distill.layers)
    return loss


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


@dataclass
class Models:
    """What a run trains and with what: the model, its tokenizer (exported with it), the kd teacher
    and the progressive conversion's schedule (None where the recipe has none)."""

    model: nn.Module
    tokenizer: object = None
    teacher: nn.Module | None = None
    blend: blending.BlendSchedule | None = None


class Uptraining:
    """One rank's share of an uptraining run (every rank of a DeepSpeed job builds one)."""

    def __init__(self, recipe: Recipe, folder: RunFolder | None, rank: int = 0, world_size: int = 1):
        self.recipe, self.folder, self.rank, self.world_size = recipe, folder, rank, world_size
        self.zero3 = recipe.zero_stage == 3
        self.last_saved: str | None = None  # the newest checkpoint tag, named when the run diverges
        self.skipped_in_a_row = 0

    # --- setup --------------------------------------------------------------------------------
    def setup(self, models: Models, data: TrainData | None, total_steps: int) -> None:
        """The DeepSpeed engine around models.model (the fast path, AdamW and its schedule, ZeRO), and
        the teacher on the engine's device. data may be None for a caller that feeds train_step itself
        (bench/uptrain_throughput.py)."""
        import deepspeed

        recipe, model = self.recipe, models.model
        self.models, self.data, self.total_steps = models, data, total_steps
        self.progress = 0.0  # step / total_steps, set by at_step
        if recipe.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.kernels = fast_path.enable(model, recipe.kernels, recipe.zero_stage, recipe.loss,
                                        torch.bfloat16 if use_bf16(recipe) else torch.float32)
        if self.kernels and self.rank == 0:
            console.print(self.kernels)
        optimizer, self.schedule = optimizer_and_schedule(model, recipe, total_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.schedule,
                                                    config=ds_config(recipe, self.world_size))
        if self.world_size == 1 and recipe.zero_stage == 0:
            # nothing to reduce, yet DeepSpeed would flatten every gradient into a bucket copy (ZeRO 1-3 need
            # their reduction path even alone: it fills the partitions' gradients)
            self.engine.enable_backward_allreduce = False
        if models.teacher is not None:
            models.teacher.to(self.engine.device)
            if use_bf16(recipe):
                models.teacher.to(torch.bfloat16)

    def resume(self, tag: str | None) -> int:
        """Load the checkpoint tag (None: the latest); returns the step it was saved at (0: none yet)."""
        state = checkpoint.resume(self.engine, self.folder.checkpoints, tag)
        start = state["step"] if state else 0
        if self.rank == 0:
            console.print(f"resumed at step {start}" if state else "no checkpoint found: starting from step 0")
        self.last_saved = f"step{start}" if start else None
        return start

    # --- one step, one eval ---------------------------------------------------------------------
    def at_step(self, step: int) -> None:
        """The blend's t and kd's weight follow the step the weights are at."""
        self.progress = step / self.total_steps
        if self.models.blend is not None:
            self.models.blend.step = step

    def train_step(self, batches: Iterable[torch.Tensor]) -> tuple[float, float | None]:
        """One optimizer step over micro-batches (DeepSpeed accumulates them): this rank's mean loss,
        and on ZeRO stage 0 the gradient norm before clipping (None elsewhere: the engine keeps it)."""
        recipe, engine = self.recipe, self.engine
        losses, norm = [], None
        for micro, batch in enumerate(batches):
            loss = batch_loss(engine, batch.to(engine.device), recipe, self.models.teacher, self.progress)
            engine.backward(loss)
            if recipe.zero_stage == 0 and micro == recipe.grad_accum - 1:
                norm = unclipped_grad_norm(engine)
            engine.step()
            losses.append(loss.item())
        return sum(losses) / len(losses), norm

    def evaluate(self) -> float:
        return eval_ppl(self.engine, self.data.eval_sequences, self.recipe.micro_batch, self.zero3)

    # --- the run folder ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int, tokens: int) -> None:
        """A resumable checkpoint after step, once the weights are checked finite."""
        if not weights_finite(self.engine):
            raise self.diverged(step, "the weights hold NaN or inf")
        checkpoint.save(self.engine, self.folder.checkpoints, step, self.recipe.keep_last,
                        {"tokens": tokens, "world_size": self.world_size})
        self.last_saved = f"step{step}"

    def export(self, folder: Path, params: list[tuple[str, nn.Parameter]] | None = None) -> None:
        checkpoint.export(self.engine, self.models.tokenizer, folder, self.export_dtype,
                          self.recipe.export_max_shard_size, params)

    def diverged(self, step: int, what: str) -> Diverged:
        kept = f"its last good checkpoint is {self.folder.checkpoints / self.last_saved}" if self.last_saved \
            else "no checkpoint was saved"
        return Diverged(f"step {step}: {what}; the run stopped without exporting ({kept}). "
                        f"Lower lr (now {self.recipe.lr:g}) and start a new run")

    # --- the loop -------------------------------------------------------------------------------
    def train(self, start: int, export_dtype: torch.dtype) -> Path:
        """Steps start..total_steps, then the final export; returns its folder."""
        recipe, data, engine = self.recipe, self.data, self.engine
        self.export_dtype = export_dtype
        log = MetricsLog(self.folder.metrics, start) if self.rank == 0 else None
        sampler = data.sampler(recipe, self.world_size)
        tokens_per_step = sampler.per_step * recipe.seq_len
        if start == 0:  # the step-0 point: what the conversion alone gives (with a blend: the source)
            self.at_step(0)
            initial = self.evaluate()
            if log:
                log.write({"step": 0, "tokens": 0, "eval_ppl": initial})
        with progress() as bar:
            task = bar.add_task("uptrain", total=self.total_steps, completed=start)
            for step in range(start, self.total_steps):
                tic, skipped_before = time.perf_counter(), engine.skipped_steps
                self.at_step(step)
                loss, norm = self.train_step(data.batch(sampler.micro_batch_at(step, micro, self.rank))
                                             for micro in range(recipe.grad_accum))
                done = step + 1
                record = self.record(done, loss, norm, engine.skipped_steps - skipped_before, tokens_per_step, tic)
                if done % recipe.eval_every == 0 or done == self.total_steps:
                    self.at_step(done)
                    record["eval_ppl"] = self.evaluate()
                if log and (done % recipe.log_every == 0 or "eval_ppl" in record or "skipped" in record):
                    log.write(record)
                if not math.isfinite(record.get("eval_ppl", 0.0)):
                    raise self.diverged(done, "the held-out perplexity overflowed (the model diverged)")
                bar.update(task, advance=1,
                           description=f"uptrain loss {record['loss']:.3f} {record['tokens_per_s']:.0f} tok/s")
                if done in recipe.export_at:  # before the checkpoint: a run killed between the two exports it again
                    self.export(self.folder.export(done), blending.layout_parameters(engine.module))
                # the last step too: a failed export (a full disk) then loses nothing, and --resume exports again
                if done % recipe.save_every == 0 or done == self.total_steps:
                    self.save_checkpoint(done, record["tokens"])
        return self.export_final(log)

    def record(self, done: int, loss: float, norm: float | None, skipped: int, tokens_per_step: int,
               tic: float) -> dict:
        """The metrics of the step that made `done` steps, every rank's loss in it; a step whose loss or
        gradients are not finite, or one too many skipped in a row, stops the run (Diverged)."""
        engine = self.engine
        mean_loss = torch.tensor(loss, dtype=torch.float64, device=engine.device)  # nccl reduces GPU tensors only
        torch.distributed.all_reduce(mean_loss)  # every rank's micro-batches count in the logged loss
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        norm = norm if norm is not None else engine.get_global_grad_norm()
        record = {"step": done, "loss": mean_loss.item() / self.world_size, "lr": self.schedule.get_last_lr()[-1],
                  "grad_norm": float(norm) if norm is not None else None, "tokens": done * tokens_per_step,
                  "tokens_per_s": tokens_per_step / (time.perf_counter() - tic)}
        if torch.cuda.is_available():
            record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if skipped:
            record["skipped"] = engine.skipped_steps
        if not math.isfinite(record["loss"]):
            raise self.diverged(done, f"the training loss is {record['loss']}")
        if not skipped and norm is not None and not math.isfinite(record["grad_norm"]):
            raise self.diverged(done, f"the gradient norm is {record['grad_norm']}")
        if self.skipped_in_a_row > self.recipe.max_skipped_steps:
            raise self.diverged(done, f"the optimizer skipped {self.skipped_in_a_row} steps in a row for gradient "
                                      f"overflow (max_skipped_steps {self.recipe.max_skipped_steps})")
        blend = self.models.blend
        if blend is not None and done - 1 < blend.steps:
            record["blend_t"] = round(blend.t, 4)
        return record

    def export_final(self, log: MetricsLog | None) -> Path:
        """final/, the plain layout (t is 1 by now: the blend's source K/V were not used since its
        last step), with export.json and the metrics plot beside it."""
        folder = self.folder
        blending.detach(self.engine.module)
        tic = time.perf_counter()
        self.export(folder.final)
        if log:
            seconds = time.perf_counter() - tic
            with user_os_errors(folder.path):  # final/ is whole already: a full disk here is one line, no traceback
                folder.export_record.write_text(json.dumps({"seconds": round(seconds, 3),
                                                            "dtype": str(self.export_dtype)}) + "\n")
                console.print(f"exported in {seconds:.1f} s")
                plot(log.records(), folder.plot, folder.path.name)
        return folder.final
