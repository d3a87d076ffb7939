"""The shared-KV layouts as Hugging Face models.

Importing this package registers ``SharedKVConfig`` with ``AutoConfig``. The model classes pull in
transformers' Llama modeling (a noticeable share of ``run.py convert``'s start-up, which needs only
the config), so ``modeling_sharedkv`` is imported on first use of one of its names here
(``models.SharedKVForCausalLM``, ``from models import kv_cache_bytes``, ...); that first use also
registers ``SharedKVForCausalLM`` with ``AutoModelForCausalLM``. Both classes are marked for
``save_pretrained`` to copy their code into the checkpoint with an ``auto_map``, so a converted
folder loads with ``trust_remote_code=True`` and no project on the path.
"""
import importlib
import shutil
from pathlib import Path

from transformers import AutoConfig

from .configuration_sharedkv import LAYOUTS, SUPPORTED_SOURCE_TYPES, SharedKVConfig

AutoConfig.register(SharedKVConfig.model_type, SharedKVConfig, exist_ok=True)
SharedKVConfig.register_for_auto_class()

MODEL_CODE_FILES = ("configuration_sharedkv.py", "modeling_sharedkv.py")
AUTO_MAP = {
    "AutoConfig": "configuration_sharedkv.SharedKVConfig",
    "AutoModelForCausalLM": "modeling_sharedkv.SharedKVForCausalLM",
}
MODELING_NAMES = ("SharedKVForCausalLM", "SharedKVModel", "kv_cache_bytes")


def __getattr__(name: str):
    """Import the modeling code (and register the model) the first time one of its names is asked for."""
    if name not in MODELING_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import AutoModelForCausalLM

    modeling = importlib.import_module(".modeling_sharedkv", __name__)
    AutoModelForCausalLM.register(SharedKVConfig, modeling.SharedKVForCausalLM, exist_ok=True)
    modeling.SharedKVForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    globals().update((n, getattr(modeling, n)) for n in MODELING_NAMES)  # later lookups skip this function
    return globals()[name]


def write_model_code(folder: str | Path) -> None:
    """Copy the modeling code into a checkpoint folder (what save_pretrained does for remote code)."""
    here = Path(__file__).resolve().parent
    for name in MODEL_CODE_FILES:
        shutil.copyfile(here / name, Path(folder) / name)


__all__ = [
    "AUTO_MAP",
    "LAYOUTS",
    "SUPPORTED_SOURCE_TYPES",
    "SharedKVConfig",
    "SharedKVForCausalLM",
    "SharedKVModel",
    "kv_cache_bytes",
    "write_model_code",
]
