"""Config for Llama-family decoders whose KV cache is shared across layers.

One config class serves every layout; ``kv_layout`` picks it (the layouts and their arithmetic
are in ``kv_layout.py``). The config extends the source model's config: every source
hyperparameter (including ones Llama does not know, such as Qwen2's ``use_sliding_window``)
survives as an attribute, so nothing of the source is lost.

This file and ``kv_layout.py`` are copied into every converted checkpoint, so they import only
transformers and each other.
"""
from __future__ import annotations

from transformers import LlamaConfig

from .kv_layout import LAYOUT_FIELDS, MODEL_TYPE, KVLayout, source_fields


class SharedKVConfig(KVLayout, LlamaConfig):
    model_type = MODEL_TYPE  # what config.json says, or transformers warns on every load

    def __init__(self, **kwargs):
        layout = {name: kwargs.pop(name) for name in LAYOUT_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        self.set_layout(**layout)

    @classmethod
    def from_source(cls, source_config, kv_layout: str, **layout_kwargs) -> SharedKVConfig:
        """Build the layout config from a supported source config, keeping every source field."""
        model_type = getattr(source_config, "model_type", None)
        fields = source_fields(source_config.to_dict(), model_type)
        return cls(kv_layout=kv_layout, source_model_type=model_type, **fields, **layout_kwargs)
