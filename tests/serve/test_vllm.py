"""vLLM serves converted checkpoints: greedy tokens and logprobs equal transformers' generate() of
the same folder (a batch of prompts of different lengths, then a prefix-cache hit), and the cache
vLLM allocates for a fixed budget grows by exactly the layout's saving."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import run
from serve.check import kv_bytes_from_config_json

BUDGET = 16 << 20  # bytes of KV cache vLLM is given
BLOCK = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """A tiny Llama (head_dim 32, the CPU kernels' smallest; 2 KV heads) and its conversions."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve")
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "source")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, root / "source" / f.name)
    for layout in ("fusedkv", "fusedkv_lite", "skipv1", "commonkv"):
        assert run.main(["convert", "--source", str(root / "source"), "--layout", layout, "--out", str(root / layout)]) == 0
    # FusedKV's copy init is FusedKV-Lite; random gates make the fusion of both caches matter
    weights = load_file(root / "fusedkv" / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for name in [n for n in weights if "_gate_" in n]:
        weights[name] = torch.rand(weights[name].shape, generator=generator) * 1.5 - 0.25
    save_file(weights, root / "fusedkv" / "model.safetensors", metadata={"format": "pt"})
    return root


def check(folder, out):
    """serve.check in its own process (vLLM keeps engine state per process)."""
    subprocess.run([sys.executable, "-m", "serve.check", str(folder), str(out), "--kv-cache-bytes", str(BUDGET),
                    "--block-size", str(BLOCK)], check=True, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1", "commonkv"])
def test_vllm_equals_transformers_and_allocates_the_layout_cache(checkpoints, tmp_path, layout):
    result = check(checkpoints / layout, tmp_path / "check.json")
    comparison, vllm = result["comparison"], result["vllm"]
    assert len(set(result["prompt_lengths"])) == len(result["prompt_lengths"])  # a batch of different lengths
    assert comparison["tokens_equal"], (vllm["tokens"], result["transformers"]["tokens"])
    assert comparison["max_logprob_abs_diff"] < 1e-4
    assert comparison["prefix_cached_rerun_equal"] and vllm["prefix_cached_rerun"]["cached_prompt_tokens"] >= BLOCK
    # the blocks vLLM allocated are the budget over the layout's bytes per token, nothing else
    per_token = result["kv_bytes_per_token"]
    assert vllm["block_size"] == BLOCK
    assert vllm["num_blocks"] == BUDGET // (per_token * BLOCK)
    source = kv_bytes_from_config_json(checkpoints / "source", 4)
    expected_ratio = {"fusedkv": 0.5, "fusedkv_lite": 0.5, "skipv1": (4 + 3 * 3) / 16, "commonkv": 0.5}[layout]
    assert per_token == source * expected_ratio


def test_source_cache_is_vllm_llama_baseline(checkpoints, tmp_path):
    """The unconverted source in vLLM's own Llama: the blocks the layouts are measured against."""
    result = check(checkpoints / "source", tmp_path / "check.json")
    assert result["comparison"]["tokens_equal"]
    assert result["vllm"]["num_blocks"] == BUDGET // (result["kv_bytes_per_token"] * BLOCK)
