"""The shared-KV layouts as Hugging Face models.

Importing this package registers ``SharedKVConfig``/``SharedKVForCausalLM`` with the Auto
classes, and marks them for ``save_pretrained`` to copy their code into the checkpoint with an
``auto_map``, so a converted folder loads with ``trust_remote_code=True`` and no project on the path.
"""
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_sharedkv import LAYOUTS, SUPPORTED_SOURCE_TYPES, SharedKVConfig
from .modeling_sharedkv import SharedKVForCausalLM, SharedKVModel, kv_cache_bytes

AutoConfig.register(SharedKVConfig.model_type, SharedKVConfig, exist_ok=True)
AutoModelForCausalLM.register(SharedKVConfig, SharedKVForCausalLM, exist_ok=True)
SharedKVConfig.register_for_auto_class()
SharedKVForCausalLM.register_for_auto_class("AutoModelForCausalLM")

MODEL_CODE_FILES = ("configuration_sharedkv.py", "modeling_sharedkv.py")
AUTO_MAP = {
    "AutoConfig": "configuration_sharedkv.SharedKVConfig",
    "AutoModelForCausalLM": "modeling_sharedkv.SharedKVForCausalLM",
}


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
