"""The convert stage: `run(ConvertOptions) -> Conversion`, a checkpoint mapped to a shared-KV
layout, streaming, atomically (`run.py convert` is its command line, convert/cli.py)."""
from __future__ import annotations

import contextlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from checkpoint_io import MANIFEST, Conversion
from checkpoint_io.dtypes import ITEMSIZE, NAMES, TORCH_NAMES
from checkpoint_io.source import TensorSource, open_source
from checkpoint_io.writer import open_shards
from common.console import console, progress
from common.errors import UserError
from common.options import parse_size
from common.outputs import atomic_folder, check_output_path, check_outside_inputs, claim_target
from common.sources import default_wikitext, is_gguf, load_tokenizer, resolve_model_path
from models import AUTO_MAP, MODEL_TYPE, write_model_code
from models.source_layout import source_fields

from .options import MIN_CALIB_TOKENS, ConvertOptions
from .plan import Plan, TargetConfig, build_plan, mark_fitted, materialize, stream
from .report import dry_run_table, fit_table, manifest

if TYPE_CHECKING:  # torch and the models come in only where a conversion computes (a copy needs neither)
    import torch

    from .layerwise import LayerPass, LayerwiseModel

MARKERS = (MANIFEST,)  # --force replaces only a folder that holds it: one convert wrote
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def layout_config(source: TensorSource, opts: ConvertOptions) -> TargetConfig:
    try:
        fields = source_fields(source.fields, source.model_type)
        kwargs = {"kv_layout": opts.layout, "source_model_type": source.model_type}
        if opts.storage_layers is not None:
            kwargs["num_storage_layers"] = opts.storage_layers
        if opts.skipv1_own_heads is not None:
            r, kv = opts.skipv1_own_heads, fields["num_key_value_heads"]
            if not 0 <= r <= kv:
                raise UserError(f"--skipv1-own-heads must be in 0..{kv}, got {r}")
            kwargs["skipv1_own_heads"] = [list(range(kv))] + [list(range(r))] * (fields["num_hidden_layers"] - 1)
        if opts.layout == "commonkv":
            kwargs.update(commonkv_ratio=opts.commonkv_ratio, commonkv_group_size=opts.commonkv_group_size)
        return TargetConfig(**fields, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(str(err)) from err
    except KeyError as err:
        raise UserError(f"the source config has no {err.args[0]}") from err


def calibration_ids(source_path: Path, opts: ConvertOptions) -> torch.Tensor:
    import torch

    path = Path(opts.calib_text) if opts.calib_text else default_wikitext("valid")
    if not path.is_file():
        raise UserError(f"calibration text {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")[: opts.calib_tokens * 16]  # plenty of characters, not a whole corpus
    except UnicodeDecodeError as err:
        raise UserError(f"calibration text {path} is not UTF-8 text (at byte {err.start}); save it as UTF-8") from err
    ids = load_tokenizer(source_path)(text, verbose=False)["input_ids"]  # whole text, cut below: no length warning
    n = min(opts.calib_tokens, len(ids))
    if n < MIN_CALIB_TOKENS:  # --calib-tokens itself is at least this (options.py): the text is too short
        raise UserError(f"calibration text {path} has only {len(ids)} tokens; give at least {MIN_CALIB_TOKENS}")
    seq = min(512, n)
    return torch.tensor(ids[: n // seq * seq]).view(-1, seq)


def source_layerwise(source: TensorSource, device: torch.device) -> LayerwiseModel:
    """The source model, one layer in memory at a time, read from its checkpoint on demand."""
    from transformers import AutoModelForCausalLM

    from .layerwise import LayerwiseModel

    return LayerwiseModel.build(lambda: AutoModelForCausalLM.from_config(source.config), source.get, device)


def target_layerwise(plan: Plan, source: TensorSource, device: torch.device) -> LayerwiseModel:
    """The converted model, one layer in memory at a time, each tensor computed by its plan rule."""
    from models import SharedKVForCausalLM

    from .layerwise import LayerwiseModel

    mappings = {m.target: m for m in plan.mappings}
    return LayerwiseModel.build(lambda: SharedKVForCausalLM(plan.config.model_config()),
                                lambda name: materialize(plan, source, mappings[name]), device)


def fit_device(opts: ConvertOptions) -> torch.device:
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch here; use --device cpu")
    return torch.device("cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu")


def fit(plan: Plan, source: TensorSource, ids: torch.Tensor, out: Path, opts: ConvertOptions) -> tuple[Plan, list[dict]]:
    """Calibrated fit, and for reconstruct the layer-wise training that starts from it. One pass of
    the source over the calibration pool feeds both; source and target have one layer in memory at a time.

    Returns the plan with fitted tensors (and, with --skipv1-heads auto, the chosen heads) and the
    per-layer report of the last fit. ids: the calibration tokens, on the device the fit runs on."""
    from .calibrate import calibrate, kv_read, layer_kv
    from .layerwise import run_source
    from .reconstruct import ReconstructOptions, SourceActivations, fits_as_dicts, reconstruct, spill_folder

    reconstructing = opts.init == "reconstruct"
    read = kv_read(plan.config)
    kv: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
    spill = spill_folder(source.config, ids, out) if reconstructing else contextlib.nullcontext()
    with spill as spill_dir:
        activations = SourceActivations(source.config, ids, spill_dir) if reconstructing else None

        def visit(step: LayerPass) -> None:
            if step.index in read:
                kv[step.index] = layer_kv(step, keys=read[step.index])
            if activations is not None:
                activations.store(step)

        if read or reconstructing:
            run_source(source_layerwise(source, ids.device), ids, visit)
        calibrated = calibrate(plan.config, kv, auto_heads=opts.skipv1_heads == "auto",
                               mean_init=opts.skipv1_init == "mean")
        kv.clear()  # the closed-form fit was their only reader
        if calibrated.skipv1_own_heads is not None:  # SkipV1's least-squares own heads are the source's rows ("first")
            plan = build_plan(source, plan.config.replace(skipv1_own_heads=calibrated.skipv1_own_heads), "first")
        mark_fitted(plan, calibrated.tensors)
        if not reconstructing:
            fit_table(calibrated.report, "calibration: relative K/V error per layer, copy init -> fitted")
            return plan, calibrated.report
        lr, mode = opts.reconstruct_settings()
        options = ReconstructOptions(steps=opts.reconstruct_steps, lr=lr, mode=mode, seed=opts.seed)
        fits, fitted = reconstruct(activations, target_layerwise(plan, source, ids.device), ids, options)
    report = fits_as_dicts(fits)
    fit_table(report, "reconstruction: normalized MSE of each layer's attention output, before -> after")
    mark_fitted(plan, fitted)
    return plan, report


def adaptive_ranks_of(plan: Plan, source: TensorSource, ids: torch.Tensor) -> tuple[Plan, list[dict]]:
    """CommonKV ranks per group from the source's hidden-state similarity on the calibration tokens ids."""
    from .commonkv import adaptive_ranks, budget_table, group_similarity

    similarity = group_similarity(source_layerwise(source, ids.device), plan.config, ids)
    ranks = adaptive_ranks(plan.config, similarity)
    report = [{"group": g, "layers": layers, "similarity": s, "rank_uniform": u, "rank": r} for g, (layers, s, u, r)
              in enumerate(zip(plan.config.commonkv_groups, similarity, plan.config.commonkv_ranks, ranks))]
    budget_table(report)
    return build_plan(source, plan.config.replace(commonkv_ranks=ranks)), report


def output_dtype(source: TensorSource, opts: ConvertOptions) -> str:
    """--dtype, else the source's (a GGUF source is dequantized to float32), as a safetensors name."""
    return NAMES[opts.dtype] if opts.dtype else source.dtypes["model.embed_tokens.weight"]


def default_out(source_path: Path, opts: ConvertOptions) -> Path:
    stem = source_path.stem if is_gguf(source_path) else source_path.name
    variant = f"r{opts.commonkv_ratio:g}" if opts.layout == "commonkv" else opts.init
    return Path("checkpoints") / f"{stem}-{opts.layout}-{variant}"


def check_output(out: Path, source_path: Path, opts: ConvertOptions, nbytes: int) -> None:
    """Refuse, before any work, an output inside an input or one that cannot be made, and a disk without room."""
    check_outside_inputs(out, {"folder": source_path if source_path.is_dir() else source_path.parent,
                               "calibration text": opts.calib_text})
    check_output_path(out)
    probe = next(p for p in out.resolve().parents if p.exists())  # where the output's bytes will go
    free = shutil.disk_usage(probe).free
    if free < nbytes * 1.05:
        raise UserError(f"not enough disk space in {probe}: the output needs ~{nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def config_json(cfg: TargetConfig, dtype: str) -> str:
    """The converted config.json: the source's fields and the layout's, and how to load them."""
    extra = {"model_type": MODEL_TYPE, "architectures": ["SharedKVForCausalLM"], "auto_map": AUTO_MAP,
             "dtype": TORCH_NAMES[dtype], "transformers_version": version("transformers")}
    return json.dumps({**cfg.to_dict(), **extra}, indent=2, sort_keys=True) + "\n"


def write_extras(folder: Path, source: TensorSource, source_path: Path, cfg: TargetConfig, dtype: str) -> None:
    """config.json with auto_map, the modeling code, the tokenizer and generation config."""
    (folder / "config.json").write_text(config_json(cfg, dtype))
    write_model_code(folder)
    if is_gguf(source_path):
        load_tokenizer(source_path).save_pretrained(folder)
        source.model.generation_config.save_pretrained(folder)
    else:
        for name in TOKENIZER_FILES:
            if (source_path / name).is_file():
                shutil.copyfile(source_path / name, folder / name)


def run(opts: ConvertOptions) -> Conversion:
    """One conversion: the plan checked, the fits computed, the folder written atomically."""
    source_path = resolve_model_path(opts.source)
    source = open_source(source_path)
    plan = build_plan(source, layout_config(source, opts), opts.skipv1_init)
    dtype = output_dtype(source, opts)
    out = Path(opts.out) if opts.out else default_out(source_path, opts)
    max_bytes = parse_size(str(opts.max_shard_size))
    if opts.dry_run:
        dry_run_table(plan, source, dtype)
        return Conversion.from_manifest(None, manifest(plan, source_path, {}, opts, dtype, []))
    check_output(out, source_path, opts, plan.param_count() * ITEMSIZE[dtype])
    inputs = [source_path] + ([Path(opts.calib_text)] if opts.calib_text else [])
    claim_target(out, opts.force, MARKERS, inputs)  # before the fits: a refusal should not wait for them
    fit_report = []
    adaptive = opts.layout == "commonkv" and opts.commonkv_rank_split == "adaptive"
    if adaptive or opts.init != "copy":  # both read the calibration tokens: tokenized once (seconds for a GGUF)
        ids = calibration_ids(source_path, opts).to(fit_device(opts))
        if adaptive:  # first: the ranks set the factors' shapes
            plan, fit_report = adaptive_ranks_of(plan, source, ids)
        if opts.init != "copy":
            plan, layer_fits = fit(plan, source, ids, out, opts)
            fit_report = fit_report + layer_fits

    with atomic_folder(out, opts.force, MARKERS, inputs) as tmp, progress() as bar:
        task = bar.add_task("writing tensors", total=len(plan.mappings))
        with open_shards(tmp, [(m.target, m.shape) for m in plan.mappings], dtype, max_bytes,
                         on_tensor=lambda: bar.advance(task)) as shards:
            # copies go from the source's one read, which also hashes it, straight to their place
            source_hash = source.scan({m.source: shards.sink(m.target, source.dtypes[m.source])
                                       for m in plan.mappings if m.rule == "copy"})
            for m in plan.mappings:
                if m.rule != "copy":
                    shards.write(m.target, stream(plan, source, m))
        write_extras(tmp, source, source_path, plan.config, dtype)
        written = manifest(plan, source_path, source_hash, opts, dtype, fit_report)
        (tmp / MANIFEST).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    console.print(f"[green]wrote[/] {out} ({opts.layout}, init {opts.init})")
    return Conversion.from_manifest(out, written)
