"""Config for Llama-family decoders whose KV cache is shared across layers.

One config class serves every layout; ``kv_layout`` picks it (the layouts and their arithmetic
are in ``kv_layout.py``). The config extends the source model's config: every source
hyperparameter (including ones Llama does not know, such as Qwen2's ``use_sliding_window``)
survives as an attribute, so nothing of the source is lost. Built from a source's config by
``models.source_layout.shared_kv_config``, which checkpoints do not ship.

This file and ``kv_layout.py`` are copied into every converted checkpoint, so they import only
transformers and each other.
"""
from __future__ import annotations

from transformers import LlamaConfig

from .kv_layout import LAYOUT_FIELDS, MODEL_TYPE, KVLayout


class SharedKVConfig(KVLayout, LlamaConfig):
    model_type = MODEL_TYPE  # what config.json says, or transformers warns on every load

    def __init__(self, **kwargs):
        layout = {name: kwargs.pop(name) for name in LAYOUT_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        self.set_layout(**layout)
