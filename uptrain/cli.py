"""`run.py uptrain`: recover a converted checkpoint's quality with a DeepSpeed ZeRO job.

    python run.py uptrain --config configs/uptrain-demo-cpu.yaml
    python run.py uptrain --config configs/uptrain-demo-cpu.yaml --resume
    python run.py uptrain --config configs/uptrain-demo-cpu.yaml --control   # the matched-compute control arm
    deepspeed --num_gpus 8 run.py uptrain --config configs/uptrain-smollm2-fusedkv.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import yaml

from common.console import console
from common.errors import UserError
from common.sources import default_model_path, load_causal_lm, load_tokenizer, resolve_model_path

from .budget import SMOLLM2_135M_PRETRAINING_TOKENS, resolve_budget
from .data import packed_sequences
from .recipe import Recipe, load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--control", action="store_true", help="train the unconverted source with the same recipe")


def source_of(recipe: Recipe) -> Path:
    """The unconverted source: the recipe's, else the one the conversion manifest names, else the default."""
    if recipe.source:
        return resolve_model_path(recipe.source)
    manifest = Path(recipe.model or "") / "conversion.json"
    if recipe.model and manifest.is_file():
        return resolve_model_path(json.loads(manifest.read_text())["source"]["path"])
    return default_model_path()


def run_folder(recipe: Recipe, model_path: Path) -> Path:
    if recipe.out:
        base = Path(recipe.out)
        return base.with_name(base.name + "-control") if recipe.control else base
    name = model_path.stem if model_path.is_file() else model_path.name
    return Path("runs") / f"uptrain-{name}{'-control' if recipe.control else ''}"


def train_and_eval_sequences(recipe: Recipe, tokenizer):
    """Packed training sequences and the held-out ones (eval_data, else the tail of data)."""
    sequences = packed_sequences(recipe.data, tokenizer, recipe.seq_len)
    if recipe.eval_data:
        train_seqs, eval_seqs = sequences, packed_sequences(recipe.eval_data, tokenizer, recipe.seq_len, split="test")
    else:
        n_eval = max(1, int(len(sequences) * recipe.eval_fraction))
        if n_eval >= len(sequences):
            raise UserError(f"data {recipe.data} is too small to hold out an eval split; give eval_data")
        train_seqs, eval_seqs = sequences[:-n_eval], sequences[-n_eval:]
    return train_seqs, eval_seqs[: max(1, recipe.eval_tokens // recipe.seq_len)]


def main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config, args.set)
    if args.control:
        recipe = dataclasses.replace(recipe, control=True)
    source_path = source_of(recipe)
    model_path = source_path if recipe.control or recipe.model is None else resolve_model_path(recipe.model)
    for spec in filter(None, (recipe.data, recipe.eval_data)):
        if "/" in spec and not Path(spec).exists():
            raise UserError(f"data {spec} does not exist")
    run_dir = run_folder(recipe, model_path)
    if (run_dir / "checkpoints" / "latest").exists() and not args.resume:
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it or set out to a new folder")

    from .engine import init_distributed
    from .train import train

    rank, world_size = init_distributed()
    if recipe.global_batch and recipe.global_batch != recipe.micro_batch * recipe.grad_accum * world_size:
        raise UserError(f"global_batch {recipe.global_batch} != micro_batch {recipe.micro_batch} x grad_accum "
                        f"{recipe.grad_accum} x {world_size} ranks")
    model = load_causal_lm(model_path).train()
    if recipe.seq_len > model.config.max_position_embeddings:
        raise UserError(f"seq_len {recipe.seq_len} exceeds the model's context ({model.config.max_position_embeddings})")
    tokenizer = load_tokenizer(model_path)
    train_seqs, eval_seqs = train_and_eval_sequences(recipe, tokenizer)
    teacher = load_causal_lm(source_path).eval() if recipe.loss != "lm" else None

    params = sum(p.numel() for p in model.parameters())
    source_params = sum(p.numel() for p in teacher.parameters()) if teacher is not None else params
    tokens_per_step = recipe.micro_batch * recipe.grad_accum * world_size * recipe.seq_len
    default_pretraining = SMOLLM2_135M_PRETRAINING_TOKENS if source_path == default_model_path() else None
    budget = resolve_budget(recipe.budget, tokens_per_step, params, source_params, default_pretraining)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=True))
        fraction = f"{100 * budget.fraction_of_pretraining:.3g}% of the source's pretraining compute" \
            if budget.fraction_of_pretraining is not None else "pretraining compute unknown"
        console.print(f"[bold]{'control arm: ' if recipe.control else ''}{model_path}[/] {params:,} params, "
                      f"{budget.steps} steps x {tokens_per_step:,} tokens = {budget.tokens:,} tokens, "
                      f"{budget.flops:.3e} FLOPs ({fraction}); {len(train_seqs)} train / {len(eval_seqs)} eval sequences")
    final = train(model, tokenizer, teacher, train_seqs, eval_seqs, recipe, budget.steps, run_dir, rank,
                  world_size, args.resume)
    if rank == 0:
        console.print(f"[green]exported[/] {final}  (metrics: {run_dir / 'metrics.jsonl'}, plot: {run_dir / 'metrics.png'})")
    return 0
