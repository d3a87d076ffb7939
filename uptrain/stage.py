"""The uptrain stage, `run(Recipe) -> Run`: recover a converted checkpoint's quality with a DeepSpeed
ZeRO job (on every rank of it), and `prepare(Recipe)`, its token stores built ahead of a job.
`run.py uptrain` is its command line (uptrain/cli.py)."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from checkpoint_io import Conversion, RunFolder, control_folder
from common.console import console
from common.data import local_root
from common.errors import UserError
from common.options import named
from common.outputs import check_output_path, check_outside_inputs
from common.sources import (
    DEFAULT_GGUF_NAME,
    default_model_path,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    resolve_model_path,
)

from . import run_folder
from .budget import SMOLLM2_135M_PRETRAINING_TOKENS, Budget, resolve_budget
from .data import TrainData, eval_specs, prepare_data, train_specs
from .recipe import Recipe

if TYPE_CHECKING:
    from .train import Models


@dataclass
class Run:
    """A finished uptraining run: its folder, the exported model, and what it cost."""
    folder: Path
    final: Path
    steps: int
    tokens: int


def source_of(recipe: Recipe) -> Path:
    """The unconverted source: the recipe's, else the one the conversion manifest names, else the model
    itself when it is no conversion (never the embedded model in its place); the embedded model only
    when no model is given."""
    if recipe.source:
        return resolve_model_path(recipe.source)
    if recipe.model is None:
        return default_model_path()
    model = resolve_model_path(recipe.model)
    conversion = Conversion.find(model) if model.is_dir() else None
    return model if conversion is None else resolve_model_path(conversion.source)


def run_folder_of(recipe: Recipe, model_path: Path) -> Path:
    if recipe.out:
        base = Path(recipe.out)
        return control_folder(base) if recipe.control_arm else base
    name = model_path.stem if model_path.is_file() else model_path.name
    base = Path("runs") / f"uptrain-{name}"
    return control_folder(base) if recipe.control_arm else base


def count_params(path: Path) -> int:
    """Parameters of a checkpoint, counted on torch's meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.sources import readable_location

    root, extra = readable_location(path)  # a GGUF through its dequantized folder, as every load reads it
    config = AutoConfig.from_pretrained(root, trust_remote_code=True, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    return sum(p.numel() for p in model.parameters())


def plan_budget(recipe: Recipe, model_path: Path, source_path: Path | None, world_size: int) -> Budget:
    params = count_params(model_path)
    source_params = count_params(source_path) if source_path not in (None, model_path) else params
    tokens_per_step = recipe.micro_batch * recipe.grad_accum * world_size * recipe.seq_len
    return resolve_budget(recipe.budget, tokens_per_step, params, source_params,
                          known_pretraining_tokens(source_path or model_path))


def known_pretraining_tokens(source: Path) -> int | None:
    """The source's pretraining tokens where they are known: SmolLM2-135M's model card for the
    embedded model, the manifest (pretraining.json) of a source this project pretrained."""
    if source.name == DEFAULT_GGUF_NAME:
        return SMOLLM2_135M_PRETRAINING_TOKENS
    manifest = source / "pretraining.json"
    if manifest.is_file():
        try:
            return int(json.loads(manifest.read_text())["tokens"])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{manifest}: no pretraining token count in it ({err})") from None
    return None


def model_paths(recipe: Recipe) -> tuple[Path, Path | None]:
    """The model to train and the unconverted source, looked up only where the run uses it (teacher,
    control arm, a budget in pretraining compute): a user's own model never needs the embedded one."""
    if recipe.control_arm or recipe.model is None:
        source = source_of(recipe)
        return source, source
    uses_source = recipe.loss != "lm" or "fraction_of_pretraining" in recipe.budget or recipe.source or recipe.blend_steps
    model, source = resolve_model_path(recipe.model), source_of(recipe) if uses_source else None
    if recipe.loss != "lm" and source == model:
        raise UserError(f"loss {recipe.loss} distils from the source, and model {recipe.model} is not a conversion "
                        "(no conversion.json): set source to the teacher")
    return model, source


def check_outputs(recipe: Recipe, model_path: Path, source_path: Path | None, run_dir: Path | None) -> None:
    """The run folder and the token cache can be made and lie inside no input: the model, the source,
    the data (the next run would read what this one wrote)."""
    inputs = {"model": model_path, "source": source_path}
    inputs.update((f"data {spec.path}", root) for spec in train_specs(recipe) + eval_specs(recipe)
                  if (root := local_root(spec)) is not None)
    for option, path in (("out", run_dir), ("token_cache", Path(recipe.token_cache))):
        if path is not None:
            check_outside_inputs(path, inputs, option)
            with named(option):
                check_output_path(path)


def prepare(recipe: Recipe) -> TrainData:
    """The token stores of data and eval_data, built (tokenized once, ahead of a job) or found."""
    model_path, source_path = model_paths(recipe)
    check_outputs(recipe, model_path, source_path, None)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    data = prepare_data(recipe, load_tokenizer(model_path), plan_budget(recipe, model_path, source_path,
                                                                          world_size).tokens)
    console.print(f"[green]token stores ready[/] {data.describe()}")
    return data


def check_plan(recipe: Recipe, budget: Budget) -> None:
    """The recipe's step counts fit the run's budget: the blend ends and every export_at lies inside it."""
    if recipe.blend_steps > budget.steps:
        raise UserError(f"blend_steps {recipe.blend_steps} is more than the run's {budget.steps} steps: "
                        "the export would not be the layout yet")
    late = [step for step in recipe.export_at if step > budget.steps]
    if late:
        raise UserError(f"export_at step {late[0]} is past the run's {budget.steps} steps")
    early = [step for step in recipe.export_at if step < recipe.blend_steps]
    if early:
        raise UserError(f"export_at step {early[0]} is inside the blend ramp (blend_steps {recipe.blend_steps}): "
                        "the model is not the layout yet")


def load_models(recipe: Recipe, model_path: Path, source_path: Path | None, tokenizer) -> Models:
    """The model to train (with its tokenizer), the kd teacher and the blend, each where the recipe asks for it."""
    from .blend import BlendSchedule, attach as attach_blend
    from .train import Models

    model = load_causal_lm(model_path).train()
    teacher = load_causal_lm(source_path).eval() if recipe.loss != "lm" else None
    blend = (BlendSchedule(recipe.blend_steps, recipe.blend_schedule, seed=recipe.seed)
             if recipe.blend_steps else None)
    if blend is not None and not attach_blend(model, source_path, blend):
        blend = None  # nothing converted (the control arm): the recipe's blend does not apply
    return Models(model, tokenizer, teacher, blend)


def run(recipe: Recipe, resume: bool = False, resume_from: str | None = None) -> Run:
    """Train (or, resuming, go on training) and export; every rank of a job calls it."""
    model_path, source_path = model_paths(recipe)
    folder = RunFolder(run_folder_of(recipe, model_path))

    from checkpoint_io.dtypes import checkpoint_dtype, torch_dtype

    from .engine import ds_config, init_distributed, return_freed_memory
    from .train import Uptraining

    return_freed_memory(count_params(model_path))  # before the token store and the models: what they free goes back too
    rank, world_size = init_distributed()
    if recipe.global_batch and recipe.global_batch != recipe.micro_batch * recipe.grad_accum * world_size:
        raise UserError(f"global_batch {recipe.global_batch} != micro_batch {recipe.micro_batch} x grad_accum "
                        f"{recipe.grad_accum} x {world_size} ranks")
    ds_config(recipe, world_size)  # a user's DeepSpeed JSON that contradicts the recipe: refused before any work
    resuming = resume or resume_from is not None
    if rank == 0:
        check_outputs(recipe, model_path, source_path, folder.path)
    with run_folder.locked(folder) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            if folder.has_checkpoint and not resuming:
                raise UserError(f"{folder.path} already holds a run; pass --resume to continue it or set out to a new folder")
            if resuming:
                run_folder.check_resume(folder, recipe, world_size)
        context = max_positions(model_path)
        if context is not None and recipe.seq_len > context:
            raise UserError(f"seq_len {recipe.seq_len} exceeds the model's context ({context})")
        budget = plan_budget(recipe, model_path, source_path, world_size)
        check_plan(recipe, budget)
        tokenizer = load_tokenizer(model_path)
        data = prepare_data(recipe, tokenizer, budget.tokens)
        if rank == 0 and resuming:
            run_folder.check_inputs(folder, data.inputs())
        models = load_models(recipe, model_path, source_path, tokenizer)
        if rank == 0:
            if not resuming or folder.recipe() is None:
                run_folder.start(folder, recipe, world_size, data.inputs())
            fraction = f"{100 * budget.fraction_of_pretraining:.3g}% of the source's pretraining compute" \
                if budget.fraction_of_pretraining is not None else "pretraining compute unknown"
            console.print(f"[bold]{'control arm: ' if recipe.control_arm else ''}{model_path}[/] "
                          f"{sum(p.numel() for p in models.model.parameters()):,} params, {budget.steps} steps x "
                          f"{budget.tokens // budget.steps:,} tokens = {budget.tokens:,} tokens, {budget.flops:.3e} "
                          f"FLOPs ({fraction}); data: {data.describe()}")
        export_dtype = torch_dtype(recipe.export_dtype) if recipe.export_dtype != "auto" else checkpoint_dtype(model_path)
        uptraining = Uptraining(recipe, folder, rank, world_size)
        uptraining.setup(models, data, budget.steps)
        start = uptraining.resume(resume_from) if resuming else 0
        final = uptraining.train(start, export_dtype)
    if rank == 0:
        console.print(f"[green]exported[/] {final}  (metrics: {folder.metrics}, plot: {folder.plot})")
    return Run(folder.path, final, budget.steps, budget.tokens)
