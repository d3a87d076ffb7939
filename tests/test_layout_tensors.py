"""models.layout_tensors: what a layout does to a checkpoint, checked against real conversions and caches."""
import json

import pytest
from safetensors import safe_open

from common.sources import load_causal_lm
from models import SharedKVForCausalLM
from models.kv_layout import LAYOUTS, dense_kv_elements_per_token
from models.layout_tensors import adapting_modules, attn_key, attn_name, layer_tensors, module_of, target_shapes
from models.source_layout import shared_kv_config
from validate.kvcache import kv_bytes_per_token, measure_decode

# Llama tied (attention without bias), Qwen2 untied (q/k/v biases), Qwen3 (q/k norms, head_dim != hidden / heads)
FAMILIES = [("llama", True), ("qwen2", False), ("qwen3", True)]


def safetensors_shapes(folder) -> dict:
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            shapes.update((key, tuple(f.get_slice(key).get_shape())) for key in f.keys())
    return shapes


@pytest.mark.parametrize("family,tied", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_lists_the_converted_tensors_and_the_cache_it_measures(make_source, cli, tmp_path, layout, family, tied):
    src = make_source(family=family, tied=tied, layers=5)
    out = tmp_path / "out"
    assert cli("convert", "--source", src, "--layout", layout, "--commonkv-rank-split", "uniform", "--out", out) == 0
    model = load_causal_lm(out)
    cfg = model.config
    expected = target_shapes(cfg)
    assert safetensors_shapes(out) == expected
    assert {name: tuple(p.shape) for name, p in model.named_parameters()} == expected  # the model code agrees
    source_keys = set(safetensors_shapes(src))
    for i in range(cfg.num_hidden_layers):
        tensors = layer_tensors(cfg, i)
        assert {attn_key(i, n) for n in (*tensors.kept, *tensors.changed, *tensors.dropped)} <= source_keys
        assert not {attn_key(i, n) for n in tensors.added} & source_keys
        assert {attn_key(i, n) for n in tensors.dropped}.isdisjoint(expected)
    manifest = json.loads((out / "conversion.json").read_text())
    measured = measure_decode(model, prompt_tokens=5, new_tokens=2)["kv_bytes_per_token"]
    assert measured == kv_bytes_per_token(cfg, 4) == manifest["kv_cache_bytes_per_token"]["converted"]
    source_measured = measure_decode(load_causal_lm(src), prompt_tokens=5, new_tokens=2)["kv_bytes_per_token"]
    assert source_measured == dense_kv_elements_per_token(cfg) * 4 == manifest["kv_cache_bytes_per_token"]["source"]
    assert kv_bytes_per_token(load_causal_lm(src).config, 4) == source_measured


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_added_or_changed_tensor_is_one_the_layer_adapts_through(layout):
    """What a conversion computes instead of copying is always fitted by reconstruct and warmed up by uptrain."""
    from tests.test_models import source_config

    cfg = shared_kv_config(source_config("qwen3", layers=5), layout)
    for i in range(cfg.num_hidden_layers):
        tensors = layer_tensors(cfg, i)
        assert {module_of(n) for n in (*tensors.added, *tensors.changed)} <= set(adapting_modules(cfg, i))
        assert bool(adapting_modules(cfg, i)) == (cfg.layer_role(i) != "store")
    names = [name for name, _ in SharedKVForCausalLM(cfg).named_parameters()]
    assert all(attn_name(attn_key(*attn_name(n))) == attn_name(n) for n in names if attn_name(n))
    assert attn_name("model.layers.3.mlp.up_proj.weight") is None and attn_name("lm_head.weight") is None


def test_kv_bytes_of_a_source_config_without_head_dim():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    cfg.head_dim = None  # older configs leave it out: hidden / heads
    assert kv_bytes_per_token(cfg, 2) == 2 * 3 * 2 * 16 * 2
