"""The shared-KV architectures: exactness against Llama, cache semantics, positions, save/load, gradients."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config
from transformers import MistralForCausalLM, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from models import SharedKVConfig, SharedKVForCausalLM
from models.modeling_sharedkv import FusedAttention, SkipV1Attention
from models.source_layout import shared_kv_config
from validate.kvcache import kv_cache_bytes
from tests.conftest import LLAMA3_ROPE, WITHOUT_PROJECT

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              max_position_embeddings=256, rope_theta=10000.0)


def source_config(family="llama", layers=4, kv_heads=2, tied=False):
    kw = dict(COMMON, num_hidden_layers=layers, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "llama3":  # 17-token inputs run past its original 8 positions
        return LlamaConfig(**{**kw, "max_position_embeddings": 32}, rope_parameters=dict(LLAMA3_ROPE))
    if family == "mistral":
        return MistralConfig(sliding_window=None, **kw)
    if family == "qwen3":
        return Qwen3Config(head_dim=32, use_sliding_window=False, **kw)  # head_dim != hidden / heads (16)
    return Qwen2Config(use_sliding_window=False, **kw)


SOURCE_CLASSES = {"llama": LlamaForCausalLM, "llama3": LlamaForCausalLM, "mistral": MistralForCausalLM,
                  "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}


def random_source(family="llama", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = source_config(family, **kw)
    model = SOURCE_CLASSES[family](cfg).eval()
    with torch.no_grad():  # biases start at zero and Qwen3's head norms at one; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def random_gates(model, seed=1):
    """Gates away from their copy init, so the fusion really mixes both layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_gate_" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 0.5)
    return model


def layout_model(layout, source=None, seed=0, **layout_kwargs):
    source = source or random_source(seed=seed)
    cfg = shared_kv_config(source.config, layout, **layout_kwargs)
    torch.manual_seed(seed + 1)
    model = SharedKVForCausalLM(cfg).eval()
    model.load_state_dict(first_heads_state(source.state_dict(), cfg), strict=False)
    return random_gates(model)


def first_heads_state(state, cfg):
    """Source weights in the layout's shapes: SkipV1 layers keep the rows of their own value heads."""
    state = dict(state)
    if cfg.kv_layout == "skipv1":
        for layer in range(1, cfg.num_hidden_layers):
            rows = torch.tensor([h * cfg.head_dim + d for h in cfg.skipv1_own_heads[layer] for d in range(cfg.head_dim)],
                                dtype=torch.long)
            for kind in ("weight", "bias"):
                key = f"model.layers.{layer}.self_attn.v_proj.{kind}"
                if key in state:
                    state[key] = state[key][rows]
    return state


LAYOUT_CASES = [
    ("fusedkv", {}),
    ("fusedkv_lite", {}),
    ("skipv1", {}),
]


# --- sharing switched off == the unconverted transformers model ----------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "llama3"])
@pytest.mark.parametrize("kv_heads,tied", [(4, False), (2, True)])
@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1"])
def test_sharing_off_equals_source_logits(family, kv_heads, tied, layout):
    source = random_source(family, kv_heads=kv_heads, tied=tied)
    off = {"num_storage_layers": 4} if layout != "skipv1" else {"skipv1_own_heads": [list(range(kv_heads))] * 4}
    cfg = shared_kv_config(source.config, layout, **off)
    model = SharedKVForCausalLM(cfg).eval()
    result = model.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(0, VOCAB, (2, 17))
    torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=0)


def test_skipv1_keeps_only_own_value_rows():
    model = layout_model("skipv1", skipv1_own_heads=[[0, 1], [1]] + [[0]] * 2)
    assert model.model.layers[1].self_attn.v_proj.weight.shape == (16, 64)
    assert model.model.layers[0].self_attn.v_proj.weight.shape == (32, 64)


def test_fusedkv_top_layers_have_no_kv_projection():
    model = layout_model("fusedkv")
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.1.self_attn.k_proj.weight" in names
    top = [n for n in names if n.startswith(("model.layers.2.", "model.layers.3."))]
    assert not any("k_proj" in n or "v_proj" in n for n in top)
    assert model.model.layers[3].self_attn.key_gate_bottom.shape == (2, 8)
    assert model.model.layers[3].self_attn.value_gate_middle.shape == (2, 16)


def test_fusedkv_copy_init_equals_lite():
    source = random_source()
    fused = SharedKVForCausalLM(shared_kv_config(source.config, "fusedkv")).eval()
    lite = SharedKVForCausalLM(shared_kv_config(source.config, "fusedkv_lite")).eval()
    fused.load_state_dict(source.state_dict(), strict=False)
    lite.load_state_dict(source.state_dict(), strict=False)
    ids = torch.randint(0, VOCAB, (1, 9))
    torch.testing.assert_close(fused(ids).logits, lite(ids).logits, atol=1e-6, rtol=0)


class FusedCache(DynamicCache):
    """A cache that makes transformers' own Llama/Qwen3 attention a FusedKV top layer: a top layer's
    update returns the fusion of the bottom and middle layers' cached (post-RoPE) K/V, with the
    gates of ``model``'s layer, instead of its own K/V."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        cfg = self.model.config
        if cfg.layer_role(layer_idx) == "store":
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        (k0, v0), (km, vm) = ((self.layers[i].keys, self.layers[i].values) for i in (0, cfg.middle_layer))
        if cfg.kv_layout == "fusedkv_lite":
            return km, v0
        attn = self.model.model.layers[layer_idx].self_attn
        return attn.fuse(k0, km, v0, vm, *attn.gates(k0.dtype))


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite"])
def test_top_layers_equal_the_source_attending_to_the_fused_cache(family, layout):
    """The fusion reads keys as the source made them (Qwen3's k_norm, scaled RoPE past the original
    context), and each top layer makes its queries as the source does (its own q_norm, the same RoPE)."""
    source = random_source(family, kv_heads=2)
    model = layout_model(layout, source=source)  # gates away from their copy init
    top = {name.removeprefix("model.layers.3.") for name, _ in model.named_parameters() if name.startswith("model.layers.3.")}
    assert not {"self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_norm.weight"} & top
    assert ("self_attn.q_norm.weight" in top) == (family == "qwen3")
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        reference = source(ids, past_key_values=FusedCache(model), use_cache=True).logits
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                                  {"rope_type": "longrope", "original_max_position_embeddings": 8,
                                   "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}])
def test_every_rope_scaling_is_applied_as_in_the_source(rope):
    """Each RoPE variant Llama's rotary embedding has, past the original context and past
    max_position_embeddings (where dynamic and longrope change their tables): same tables, same logits."""
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**{**COMMON, "max_position_embeddings": 32}, num_hidden_layers=4,
                                          num_key_value_heads=2, rope_parameters=dict(rope))).eval()
    cfg = shared_kv_config(source.config, "fusedkv", num_storage_layers=4)
    model = SharedKVForCausalLM(cfg).eval()
    model.load_state_dict(source.state_dict())
    assert model.model.rotary_emb.rope_type == rope["rope_type"]
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, source.model.rotary_emb.inv_freq, atol=0, rtol=0)


# --- incremental decoding equals a full forward --------------------------------------------------

def incremental_logits(model, ids, prefix):
    out = model(ids[:, :prefix], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("layers", [4, 5])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("layout,kwargs", LAYOUT_CASES)
def test_incremental_decoding_equals_full_forward(layout, kwargs, kv_heads, layers):
    source = random_source(layers=layers, kv_heads=kv_heads)
    model = layout_model(layout, source=source, **kwargs)
    ids = torch.randint(0, VOCAB, (2, 14))
    full = model(ids).logits
    inc, _ = incremental_logits(model, ids, prefix=6)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
@pytest.mark.parametrize("layout,kwargs", LAYOUT_CASES)
def test_new_sources_decode_incrementally_and_cache_what_the_arithmetic_says(family, layout, kwargs):
    """Qwen3 (head_dim != hidden / heads, q/k norms) and Llama 3 RoPE past the original context,
    decoded by the inference paths (FusedKV's factored step, SkipV1's head blocks)."""
    model = layout_model(layout, source=random_source(family, kv_heads=2), **kwargs)
    ids = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        inc, cache = incremental_logits(model, ids, prefix=10)
        torch.testing.assert_close(inc, model(ids).logits, atol=1e-5, rtol=0)
    assert kv_cache_bytes(cache) == model.config.kv_cache_bytes_per_token(4) * 2 * 17


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_fusedkv_decode_without_fusing_equals_full_forward(kv_heads, attn, grad, monkeypatch):
    """Decode steps (one new token on a cache) attend to the two caches without building the fused
    K/V (FusedAttention.decode_step), whether or not autograd records; every other call (prefill,
    the full forward) fuses. With a left-padded row the steps still equal the full forward."""
    model = layout_model("fusedkv", source=random_source(kv_heads=kv_heads))
    model.config._attn_implementation = attn
    calls = []
    original = FusedAttention.decode_step
    monkeypatch.setattr(FusedAttention, "decode_step", lambda self, *a: calls.append(1) or original(self, *a))
    ids = torch.randint(0, VOCAB, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.set_grad_enabled(grad):
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits)
    inc = torch.cat(steps, dim=1)
    assert inc.requires_grad == grad
    assert len(calls) == 8 * 2  # every decode step, in both top layers
    torch.testing.assert_close(inc[0], full[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(inc[1, 3:], full[1, 3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("own", [[[0, 1]] * 4, [[0, 1], [0], [], [0, 1]]])
def test_skipv1_with_a_cache_attends_by_head_block_like_training(own, attn, monkeypatch):
    """With a cache, SkipV1 attends own and reused heads as two blocks (no concatenated values);
    the logits equal the concatenating path of calls without one (training), also decoding step by step."""
    model = layout_model("skipv1", skipv1_own_heads=own)
    model.config._attn_implementation = attn
    blocks = []
    original = SkipV1Attention.attention
    monkeypatch.setattr(SkipV1Attention, "attention",
                        lambda self, q, k, v, *a, **kw: blocks.append(isinstance(v, tuple)) or original(self, q, k, v, *a, **kw))
    ids = torch.randint(0, VOCAB, (2, 12))
    concatenated = model(ids, use_cache=False).logits.detach()  # the training path: one value tensor
    assert not any(blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, concatenated, atol=1e-5, rtol=0)
        inc, _ = incremental_logits(model, ids, prefix=5)
    torch.testing.assert_close(inc, concatenated, atol=1e-5, rtol=0)
    assert any(blocks)


def test_skipv1_odd_kv_heads_with_arbitrary_own_heads():
    torch.manual_seed(0)
    src = LlamaForCausalLM(LlamaConfig(**{**COMMON, "hidden_size": 48, "num_attention_heads": 6,
                                          "num_key_value_heads": 3, "num_hidden_layers": 3})).eval()
    cfg = shared_kv_config(src.config, "skipv1", skipv1_own_heads=[[0, 1, 2], [2], [0, 2]])
    model = SharedKVForCausalLM(cfg).eval()
    model.load_state_dict(first_heads_state(src.state_dict(), cfg), strict=False)
    ids = torch.randint(0, VOCAB, (1, 10))
    inc, cache = incremental_logits(model, ids, prefix=3)
    torch.testing.assert_close(inc, model(ids).logits, atol=1e-5, rtol=0)
    assert cache.layers[1].values.shape[1] == 1 and cache.layers[2].values.shape[1] == 2
    # Layer 1 attends with layer 0's value heads 0 and 1 and its own head 2, each at its own index.
    captured = {}

    class Capture(torch.nn.Module):  # through the model's K/V substitution hook, changing nothing
        def forward(self, attn, *inputs):
            return captured.setdefault("kv", attn.keys_values(*inputs))

    model.model.layers[1].self_attn.kv_substitute = Capture()
    model(ids)
    v1 = captured["kv"][1]
    v0 = model.model.layers[0].self_attn.project(
        model.model.layers[0].self_attn.v_proj, model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)))
    torch.testing.assert_close(v1[:, :2], v0[:, :2])
    assert not torch.allclose(v1[:, 2], v0[:, 2])


def test_skipv1_default_own_heads_is_half_of_kv_heads():
    cfg = shared_kv_config(source_config(kv_heads=4), "skipv1")
    assert cfg.skipv1_own_heads[1:] == [[0, 1]] * 3
    cfg3 = SharedKVConfig(**{**source_config(kv_heads=1).to_dict(), "kv_layout": "skipv1"})
    assert cfg3.skipv1_own_heads[1] == []


# --- the cache really holds only the shared layers' K/V -----------------------------------------

@pytest.mark.parametrize("layers", [4, 5])
@pytest.mark.parametrize("layout,kwargs", LAYOUT_CASES + [("skipv1", {"skipv1_own_heads": [[0, 1], [1]] + [[]] * 3})])
def test_measured_cache_bytes_equal_arithmetic(layout, kwargs, layers):
    source = random_source(layers=layers, kv_heads=2)
    if layout == "skipv1" and "skipv1_own_heads" in kwargs:
        kwargs = {"skipv1_own_heads": kwargs["skipv1_own_heads"][:layers]}
    model = layout_model(layout, source=source, **kwargs)
    batch, tokens = 3, 11
    _, cache = incremental_logits(model, torch.randint(0, VOCAB, (batch, tokens)), prefix=5)
    cfg = model.config
    per_token = cfg.kv_cache_bytes_per_token(4)
    assert kv_cache_bytes(cache) == per_token * batch * tokens
    head_bytes = cfg.head_dim * 4
    full = 2 * layers * cfg.num_key_value_heads * head_bytes
    storing = cfg.num_storage_layers
    if layout in ("fusedkv", "fusedkv_lite"):
        assert per_token == 2 * storing * cfg.num_key_value_heads * head_bytes
        assert storing == (layers + 1) // 2
        if layers % 2 == 0:
            assert per_token * 2 == full
    else:
        own = sum(len(h) for h in cfg.skipv1_own_heads[1:])
        assert per_token == (layers * cfg.num_key_value_heads + cfg.num_key_value_heads + own) * head_bytes


# --- FusedKV keeps attention relative ------------------------------------------------------------

def shifted_logits(model, ids, shift):
    positions = torch.arange(ids.shape[1])[None] + shift
    return model(ids, position_ids=positions).logits


def test_fusedkv_logits_invariant_to_position_shift():
    model = layout_model("fusedkv")
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(shifted_logits(model, ids, 0), shifted_logits(model, ids, 37), atol=2e-5, rtol=0)


def test_untied_rope_pair_gates_would_break_relative_positions(monkeypatch):
    """The tie is what keeps FusedKV relative: a gate that differs within a RoPE pair fails the shift check."""
    model = layout_model("fusedkv")
    monkeypatch.setattr(FusedAttention, "key_gate", staticmethod(
        lambda half: torch.cat((half, half.flip(-1)), dim=-1)[None, :, None, :]))
    ids = torch.randint(0, VOCAB, (2, 12))
    diff = (shifted_logits(model, ids, 0) - shifted_logits(model, ids, 37)).abs().max()
    assert diff > 1e-3


# --- generate -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1"])
def test_batched_left_padded_generation_matches_single_sequences(layout):
    model = layout_model(layout)
    model.generation_config.pad_token_id = 0
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (7, 4)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[row, width:], single[0, len(p):])


def test_sampled_generation_is_reproducible_with_a_seed():
    model = layout_model("fusedkv")
    ids = torch.randint(1, VOCAB, (2, 5))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                   do_sample=True, top_k=20, pad_token_id=0))
    assert runs[0].shape == (2, 13) and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("layout", ["fusedkv", "skipv1"])
def test_eager_and_sdpa_attention_agree(layout):
    model = layout_model(layout)
    ids = torch.randint(0, VOCAB, (2, 10))
    model.config._attn_implementation = "eager"
    eager = model(ids).logits
    model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(model(ids).logits, eager, atol=1e-5, rtol=0)


# --- save / load ---------------------------------------------------------------------------------

LOAD_SCRIPT = WITHOUT_PROJECT + """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
print(json.dumps({"logits": model(ids).logits.tolist(), "class": type(model).__name__}))
"""


@pytest.mark.parametrize("layout", ["fusedkv", "skipv1"])
def test_save_and_reload_in_fresh_process_without_project(tmp_path, layout):
    model = layout_model(layout, source=random_source("qwen2"))
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_sharedkv.SharedKVForCausalLM"
    ids = torch.randint(0, VOCAB, (1, 8))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "ckpt"), json.dumps(ids.tolist())],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["class"] == "SharedKVForCausalLM"
    torch.testing.assert_close(torch.tensor(result["logits"]), model(ids).logits, atol=1e-5, rtol=0)


def test_reload_in_process_keeps_layout_fields(tmp_path):
    model = layout_model("skipv1", skipv1_own_heads=[[0, 1], [1], [0], [1]])
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert again.config.skipv1_own_heads == [[0, 1], [1], [0], [1]]
    assert again.config.qkv_bias is False and again.config.kv_layout == "skipv1"


# --- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1"])
def test_gradients_reach_every_gate_and_projection(layout):
    model = layout_model(layout).train()
    ids = torch.randint(0, VOCAB, (2, 10))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = layout_model("fusedkv").train()
    ids = torch.randint(0, VOCAB, (2, 10))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


# --- config validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    ({"kv_layout": "nope"}, "unknown kv_layout"),
    ({"num_hidden_layers": 1}, "at least 2 layers"),
    ({"num_storage_layers": 9}, "num_storage_layers"),
    ({"kv_layout": "skipv1", "skipv1_own_heads": [[0, 1], [5], [0], [0]]}, "distinct heads"),
])
def test_config_rejects_bad_layout_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        SharedKVConfig(**{**source_config().to_dict(), **bad})


def test_unsupported_source_architecture_is_named():
    from transformers import GPT2Config
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2, qwen3"):
        shared_kv_config(GPT2Config(), "fusedkv")
    with pytest.raises(ValueError, match="sliding window"):
        shared_kv_config(MistralConfig(sliding_window=64, **COMMON), "fusedkv")
