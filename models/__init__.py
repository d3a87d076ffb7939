"""The shared-KV layouts as Hugging Face models.

Nothing heavy is imported with the package: the layout arithmetic (``kv_layout``), which sources
convert and to what config (``source_layout``), and what a layout does to a checkpoint's tensors
(``layout_tensors``) are plain Python, and a copy conversion needs nothing else. Checkpoints ship
only the model and its layout description (``MODEL_CODE_FILES``): the conversion's screening and
choices and validate's measurements (validate/kvcache.py) stay here.
``SharedKVConfig`` (transformers, which imports torch: seconds) is imported on first use of its
name; the first use of a modeling name (``models.SharedKVForCausalLM``, ``from models import
SharedKVModel``) imports the modeling code and registers ``SharedKVForCausalLM`` with
``AutoModelForCausalLM``. Both classes are marked for ``save_pretrained`` to copy their code into
the checkpoint with an ``auto_map``, so a converted folder loads with ``trust_remote_code=True``
and no project on the path. The config is not registered with ``AutoConfig``: its model_type is
"llama" (``kv_layout.MODEL_TYPE``), and registering it would make every Llama config in the
process a ``SharedKVConfig``.
"""
import importlib
import shutil
from pathlib import Path

from .kv_layout import LAYOUTS, MODEL_TYPE
from .source_layout import SUPPORTED_SOURCE_TYPES

MODEL_CODE_FILES = ("configuration_sharedkv.py", "kv_layout.py", "modeling_sharedkv.py")
AUTO_MAP = {
    "AutoConfig": "configuration_sharedkv.SharedKVConfig",
    "AutoModelForCausalLM": "modeling_sharedkv.SharedKVForCausalLM",
}
MODELING_NAMES = ("SharedKVForCausalLM", "SharedKVModel")


def _import_config() -> None:
    config = importlib.import_module(".configuration_sharedkv", __name__)
    config.SharedKVConfig.register_for_auto_class()
    globals()["SharedKVConfig"] = config.SharedKVConfig  # later lookups skip __getattr__


def _import_modeling() -> None:
    from transformers import AutoModelForCausalLM

    _import_config()
    modeling = importlib.import_module(".modeling_sharedkv", __name__)
    AutoModelForCausalLM.register(modeling.SharedKVConfig, modeling.SharedKVForCausalLM, exist_ok=True)
    modeling.SharedKVForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    globals().update((n, getattr(modeling, n)) for n in MODELING_NAMES)


def __getattr__(name: str):
    """Import (and register) the config or the modeling code the first time one of its names is asked for."""
    if name == "SharedKVConfig":
        _import_config()
    elif name in MODELING_NAMES:
        _import_modeling()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return globals()[name]


def write_model_code(folder: str | Path) -> None:
    """Copy the modeling code into a checkpoint folder (what save_pretrained does for remote code)."""
    here = Path(__file__).resolve().parent
    for name in MODEL_CODE_FILES:
        shutil.copyfile(here / name, Path(folder) / name)


__all__ = [
    "AUTO_MAP",
    "LAYOUTS",
    "MODEL_TYPE",
    "SUPPORTED_SOURCE_TYPES",
    "SharedKVConfig",
    "SharedKVForCausalLM",
    "SharedKVModel",
    "write_model_code",
]
