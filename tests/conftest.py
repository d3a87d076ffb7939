"""Shared fixtures: tiny checkpoints on disk that carry the real SmolLM2 tokenizer."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers import Qwen3Config, Qwen3ForCausalLM

import run
from common.sources import default_wikitext

# The project's packages and modules (pyproject.toml), which `pip install -e .` makes importable from
# anywhere: a fresh process that must do without them (a converted folder loads on its own) starts
# with this line, so that an import of one of them fails there as it would on a user's machine.
WITHOUT_PROJECT = ("import sys; sys.modules.update(dict.fromkeys(('common', 'checkpoint_io', 'convert', 'uptrain', 'validate', "
                   "'models', 'serve', 'bench', 'run', 'demo')))\n")

# One thread per test process (make test runs two workers on two cores), and for the processes tests start.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Llama 3.x RoPE scaled for a tiny model: trained on 8 positions, stretched 4x, so the 12-token
# test inputs already run past the original context.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "use_sliding_window": False}),  # head_dim != hidden / heads
    "llama3": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 32}),
}


def as_hub_llama3(folder: Path) -> None:
    """config.json as Llama 3.x checkpoints on the hub have it: rope_theta and rope_scaling, the
    names from before transformers 5, which the copy path passes through unread."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    path.write_text(json.dumps(config, indent=2))


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
        config = config_cls(**{**dict(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                                      max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=1,
                                      eos_token_id=2), **extra})
        torch.manual_seed(seed)
        model = model_cls(config)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias"):
                    p.normal_(0, 0.2)
                if pname.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's start at one: make them matter
                    p.uniform_(0.5, 1.5)
        folder = tmp_path / name
        model.save_pretrained(folder, max_shard_size=shard or "5GB")
        if family == "llama3":
            as_hub_llama3(folder)
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


# uptrain runs: a tiny FusedKV conversion, 40,000 characters of WikiText, 6 steps of 4 x 32 tokens
UPTRAIN_BASE = dict(seq_len=32, micro_batch=4, budget={"steps": 6}, lr=3e-3, warmup_steps=1, eval_every=3,
                    save_every=3, eval_tokens=128, zero_stage=2)


@pytest.fixture
def converted(make_source, cli, tmp_path):
    src = make_source()
    out = tmp_path / "converted"
    assert cli("convert", "--source", src, "--layout", "fusedkv", "--out", out) == 0
    return out


@pytest.fixture
def text_file(tmp_path):
    """A few hundred characters of plain prose: a held-out text for validate runs on tiny models."""
    path = tmp_path / "heldout.txt"
    path.write_text("The river town grew up around a ford where the water ran shallow. " * 8)
    return path


@pytest.fixture
def train_text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(default_wikitext("valid").read_text()[:40000])
    return path


@pytest.fixture
def recipe(tmp_path, converted, train_text):
    def write(name="run", **overrides):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**UPTRAIN_BASE, "model": str(converted), "data": str(train_text),
                                        "out": str(tmp_path / name), "token_cache": str(tmp_path / "tokens"),
                                        **overrides}))
        return path

    return write


