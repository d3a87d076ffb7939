"""bench/uptrain_throughput.py: the plain reference loop trains, and the mini shape is the parity source's."""
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.shapes import MINI_MHA, TINY
from bench.uptrain_throughput import plain_step
from uptrain.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


def test_the_mini_shape_is_the_committed_mha_source():
    committed = json.loads((ROOT / "data" / "mini-sources" / "mha" / "config.json").read_text())
    assert {key: committed[key] for key in MINI_MHA} == MINI_MHA


def test_the_plain_loop_lowers_the_loss_on_its_batch():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "num_hidden_layers": 2}))
    batch = torch.randint(0, TINY["vocab_size"], (2, 16))
    before = model(batch, labels=batch).loss.item()
    step = plain_step(model, Recipe(lr=1e-3), batch)
    for _ in range(5):
        step()
    assert model(batch, labels=batch).loss.item() < before - 0.1
