"""What a conversion tells the user: the dry-run table and the conversion.json manifest."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from rich.table import Table

from checkpoint_io.dtypes import ITEMSIZE, TORCH_NAMES
from checkpoint_io.source import TensorSource
from common.console import console
from models.kv_layout import dense_kv_elements_per_token
from models.layout_tensors import source_shapes

from .options import ConvertOptions
from .plan import Plan


def kv_bytes_before_after(plan: Plan, dtype: str) -> dict[str, int]:
    """KV-cache bytes per token of the source and of the converted model, at the output dtype."""
    element = ITEMSIZE[dtype]
    return {"source": dense_kv_elements_per_token(plan.config) * element,
            "converted": plan.config.kv_cache_bytes_per_token(element)}


def dry_run_table(plan: Plan, source: TensorSource, dtype: str) -> None:
    cfg = plan.config
    table = Table(title=f"conversion plan: {cfg.source_model_type} -> {cfg.kv_layout}")
    for col in ("target", "rule", "source", "shape"):
        table.add_column(col, overflow="fold")
    for m in plan.mappings:
        if m.rule != "copy":
            table.add_row(m.target, m.rule, m.source or "-", "x".join(map(str, m.shape)))
    for key in plan.dropped:
        table.add_row("-", "drop", key, "x".join(map(str, source.shapes[key])))
    console.print(table)
    rules = Counter(m.rule for m in plan.mappings)
    before = sum(math.prod(s) for s in source_shapes(cfg).values())  # a tied lm_head counts once
    kv_before, kv_after = kv_bytes_before_after(plan, dtype).values()
    summary = Table(title="summary", show_header=False)
    summary.add_row("tensors kept (copy)", str(rules["copy"]))
    summary.add_row("tensors reshaped (heads)", str(rules["heads"]))
    summary.add_row("tensors new (fill)", str(rules["fill"]))
    if rules["svd"]:
        summary.add_row("tensors factored (svd; CommonKV ranks uniform until calibration)", str(rules["svd"]))
    summary.add_row("tensors dropped", str(len(plan.dropped)))
    summary.add_row("parameters", f"{before:,} -> {plan.param_count():,}")
    summary.add_row(f"KV cache bytes/token ({TORCH_NAMES[dtype]})",
                    f"{kv_before:,} -> {kv_after:,} ({100 * (1 - kv_after / kv_before):.1f}% saved)")
    console.print(summary)


def fit_table(rows: list[dict], title: str) -> None:
    """Per-layer errors of a fit (calibrated or reconstruct): the user sees what the fit bought."""
    table = Table(title=title)
    extra = [k for k in rows[0] if k not in ("layer", "error_before", "error_after")] if rows else []
    for col in ("layer", *extra, "before", "after"):
        table.add_column(col.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(str(row["layer"]), *(str(row[k]) for k in extra),
                      f"{row['error_before']:.4f}", f"{row['error_after']:.4f}")
    console.print(table)


def manifest(plan: Plan, source_path: Path, source_hash: dict, opts: ConvertOptions, dtype: str,
             fit_report: list[dict]) -> dict:
    """conversion.json: the executed plan plus what is needed to reproduce or audit it."""
    lr, mode = opts.reconstruct_settings()
    options = {**dataclasses.asdict(opts), "reconstruct_lr": lr, "reconstruct_mode": mode}
    return {
        "source": {"path": str(source_path), **source_hash, "model_type": plan.config.source_model_type},
        "layout": plan.config.kv_layout,
        "init": opts.init,
        "options": {k: v for k, v in sorted(options.items()) if k not in ("force", "dry_run", "out")},
        "dtype": TORCH_NAMES[dtype],
        "kv_cache_bytes_per_token": kv_bytes_before_after(plan, dtype),
        "mappings": [m.as_dict() for m in plan.mappings],
        "dropped": plan.dropped,
        "fit": fit_report,
        "versions": {"torch": version("torch").split("+")[0], "transformers": version("transformers"),
                     "safetensors": version("safetensors"), "kvshare-uptrain": "0.1.0"},
    }
