"""Shared fixtures: tiny checkpoints on disk that carry the real SmolLM2 tokenizer."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import run

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded model's tokenizer saved once as plain files (vocab 49,152)."""
    from common.sources import load_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(None).save_pretrained(folder)
    return folder


@pytest.fixture
def make_source(tmp_path, tokenizer_dir):
    """Save a tiny random source checkpoint (with the tokenizer) and return its folder."""

    def make(name="src", family="llama", layers=4, kv_heads=2, tied=True, seed=0, shard=None, hidden=32):
        config_cls, model_cls, extra = FAMILIES[family]
        config = config_cls(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                            max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=1,
                            eos_token_id=2, **extra)
        torch.manual_seed(seed)
        model = model_cls(config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.normal_(0, 0.2)
        folder = tmp_path / name
        model.save_pretrained(folder, max_shard_size=shard or "5GB")
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, folder / f.name)
        return folder

    return make


@pytest.fixture
def cli():
    """run.py's main with a list of arguments; returns the exit code."""

    def call(*argv) -> int:
        try:
            return run.main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse rejects bad flags with exit 2
            return exit_.code

    return call
