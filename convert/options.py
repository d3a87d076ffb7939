"""What a conversion is asked to do: `ConvertOptions`, the one declaration the CLI, a `--config`
file, the demo and the benchmarks all go through (common/options.py loads and checks it)."""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError
from common.options import SEEDS, Range, option, shard_size
from models import LAYOUTS

INITS = ("copy", "calibrated", "reconstruct")
MIN_CALIB_TOKENS = 64  # one short sequence: fewer leave nothing to fit on
# Measured on SmolLM2-135M (bench/results/reconstruct_lr_sweep_cuda.json): lr 1e-2 sequential fits
# FusedKV/Lite/SkipV1 best, but moves CommonKV's SVD factors so far that step 0 is 9,821 (1e-3: 29.7)
# and uptraining starts by diverging; every CommonKV layer changes, so independent fits beat
# sequential ones, which ask each layer to cancel the drift of all layers below.
RECONSTRUCT_DEFAULTS = {"commonkv": {"reconstruct_lr": 1e-3, "reconstruct_mode": "independent"}}
RECONSTRUCT_DEFAULT = {"reconstruct_lr": 1e-2, "reconstruct_mode": "sequential"}


@dataclass
class ConvertOptions:
    source: str | None = option(None, "HF folder of safetensors, or a .gguf file (none: the embedded SmolLM2-135M)")
    layout: str = option("fusedkv", "target layout", choices=LAYOUTS)
    out: str | None = option(None, "output folder (none: checkpoints/<source>-<layout>-<init>; CommonKV: -r<ratio>)")
    init: str = option("copy", "initialization of what the layout changes", choices=INITS)
    skipv1_init: str = option("mean", "SkipV1 own value heads: mean with their partner, or as they are",
                              choices=("mean", "first"))
    skipv1_own_heads: int | None = option(None, "SkipV1 own value heads per layer (none: kv_heads // 2)", within=Range(at_least=0))
    skipv1_heads: str = option("first", "SkipV1 own heads: the first ones, or chosen by calibration",
                               choices=("first", "auto"))
    storage_layers: int | None = option(None, "FusedKV layers that store K/V (none: ceil(layers / 2))", within=Range(at_least=1))
    commonkv_ratio: float = option(0.5, "CommonKV cached bytes / the source's", within=Range(above=0, at_most=1))
    commonkv_group_size: int | None = option(None, "CommonKV adjacent layers per shared latent (none: floor(1 / ratio))",
                                             within=Range(at_least=1))
    commonkv_rank_split: str = option("adaptive", "CommonKV ranks: from hidden-state similarity on calibration text, "
                                  "or equal per layer", choices=("adaptive", "uniform"))
    calib_text: str | None = option(None, "calibration text (none: the shipped WikiText-2 validation split)")
    calib_tokens: int = option(16384, "calibration tokens (the whole text when it holds fewer)", within=Range(at_least=MIN_CALIB_TOKENS))
    reconstruct_steps: int = option(150, "Adam steps per layer for the reconstruct init (0: the calibrated fit)",
                                    within=Range(at_least=0))
    reconstruct_lr: float | None = option(None, "Adam learning rate for reconstruct (none: 1e-2; CommonKV 1e-3)",
                                          within=Range(above=0))
    reconstruct_mode: str | None = option(None, "reconstruct layers one after the other on the converted layers' "
                                          "outputs, or each on the source's (none: sequential; CommonKV independent)",
                                          choices=(None, "sequential", "independent"))
    seed: int = option(0, "seed for reconstruct", within=Range(at_least=0, below=SEEDS))
    device: str = option("auto", "where calibration and reconstruct run (auto: a GPU if there is one)",
                         choices=("auto", "cpu", "cuda"))
    dtype: str | None = option(None, "output dtype (none: the source's)", choices=(None, "float32", "bfloat16", "float16"))
    max_shard_size: str = option("5GB", "largest output shard, e.g. 2GB (a larger tensor gets a shard of its own)")
    dry_run: bool = option(False, "print the plan, write nothing")
    force: bool = option(False, "replace an output folder that an earlier conversion wrote")

    def check(self) -> None:
        shard_size("max_shard_size", self.max_shard_size)
        if self.layout == "commonkv" and self.init == "calibrated":
            raise UserError("commonkv has no closed-form calibrated fit: use --init copy (its SVD) or reconstruct")
        if self.skipv1_heads == "auto" and self.init == "copy":
            raise UserError("--skipv1-heads auto picks heads from calibration text: add --init calibrated (or reconstruct)")

    def reconstruct_settings(self) -> tuple[float, str]:
        """Reconstruct's learning rate and mode: as given, else the layout's measured defaults."""
        defaults = RECONSTRUCT_DEFAULTS.get(self.layout, RECONSTRUCT_DEFAULT)
        return (self.reconstruct_lr if self.reconstruct_lr is not None else defaults["reconstruct_lr"],
                self.reconstruct_mode or defaults["reconstruct_mode"])


# The options with a flag of their own; the rest are --set/--config keys (all of convert's: a
# conversion is described by a handful of values)
FLAGS = tuple(f for f in ConvertOptions.__dataclass_fields__)
