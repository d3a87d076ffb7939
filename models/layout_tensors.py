"""What a layout does to a checkpoint, tensor by tensor: where convert, reconstruct and uptrain ask.

Tensors go by their Hugging Face Llama names (``layer_key``, ``attn_key`` build them, ``attn_name``
reads them back). A layout touches only attention; per layer it keeps a source tensor as it is,
drops it, changes it (same name, other rows: SkipV1's own value heads) or adds one the source
lacks (FusedKV's gates, CommonKV's factors): ``layer_tensors``. ``source_shapes`` and
``target_shapes`` are every tensor of the source and of the converted checkpoint.

Two questions about a converted layer have different answers, and both are asked:

* what the conversion computes instead of copying: the added and changed tensors (the plan's
  rules other than copy);
* through what the layer adapts to its new K/V (``ADAPTING``): those tensors and the copied
  ones whose inputs changed meaning, such as q_proj and o_proj, whose queries now meet other keys
  or whose input now holds other values. ``--init reconstruct`` fits exactly these, and uptrain's
  ``warmup_new_params_steps`` trains exactly these before everything else.

Plain Python on a ``KVLayout`` (no torch): the copy conversion plans with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .kv_layout import FUSED_GATE_INIT, KVLayout

Shape = tuple[int, ...]

# Source attention modules a layer of each role does without: top layers read other layers' K/V
# (keys already normalized), CommonKV rebuilds K/V from a latent and keeps k_norm for the rebuilt keys.
DROPPED = {"fused": ("k_proj", "v_proj", "k_norm"), "lite": ("k_proj", "v_proj", "k_norm"),
           "commonkv": ("k_proj", "v_proj")}
# The attention modules through which a converted layer adapts to its new K/V (see the module
# docstring): every module it adds or changes, plus the copied q_proj and o_proj around the changed
# K/V, each with the norm of the heads it makes (Qwen3's q_norm; CommonKV's k_norm of rebuilt keys).
# kv_down exists only on a CommonKV group's anchor. Storage layers are unchanged: nothing adapts.
ADAPTING = {
    "fused": ("q_proj", "q_norm", "o_proj", *FUSED_GATE_INIT),
    "lite": ("q_proj", "q_norm", "o_proj"),
    "skipv1": ("q_proj", "q_norm", "v_proj", "o_proj"),
    "commonkv": ("q_proj", "q_norm", "kv_down", "kv_up", "k_norm", "o_proj"),
}


def layer_key(layer: int, *names: str) -> str:
    """'model.layers.{layer}', with names appended: a decoder layer, or a module or tensor in it."""
    return ".".join((f"model.layers.{layer}", *names))


def attn_key(layer: int, name: str) -> str:
    """A layer's attention module or tensor, e.g. attn_key(3, 'q_proj.weight')."""
    return layer_key(layer, "self_attn", name)


def attn_name(key: str) -> tuple[int, str] | None:
    """(layer, name under self_attn) of an attention tensor key, the inverse of attn_key; None for
    any other key. 'model.layers.3.self_attn.q_proj.weight' -> (3, 'q_proj.weight')."""
    parts = key.split(".")
    if len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "self_attn":
        return int(parts[2]), ".".join(parts[4:])
    return None


def module_of(name: str) -> str:
    """The module a tensor under self_attn belongs to: 'q_proj.weight' -> 'q_proj', 'key_gate_bottom' -> itself."""
    return name.split(".")[0]


@dataclass(frozen=True)
class LayerTensors:
    """One layer's attention tensors (names under self_attn) in the converted checkpoint, against the source's."""

    kept: dict[str, Shape]  # copied as they are
    changed: dict[str, Shape]  # same name, computed from the source tensor, new shape
    added: dict[str, Shape]  # not in the source
    dropped: dict[str, Shape]  # source tensors the layer does without, with their source shapes


def source_attention(cfg: KVLayout) -> dict[str, Shape]:
    """One source layer's attention tensors, names under self_attn: Llama's q/k/v/o (Qwen2's q/k/v
    biases, Llama's attention_bias) and Qwen3's per-head q/k norms."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {}
    for proj, shape in {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}.items():
        shapes[f"{proj}.weight"] = shape
        if cfg.attention_bias if proj == "o_proj" else cfg.qkv_bias:
            shapes[f"{proj}.bias"] = shape[:1]
    if cfg.qk_norm:
        shapes["q_norm.weight"] = shapes["k_norm.weight"] = (d,)
    return shapes


def layer_tensors(cfg: KVLayout, layer: int) -> LayerTensors:
    role = cfg.layer_role(layer)
    source = source_attention(cfg)
    dropped = {n: s for n, s in source.items() if module_of(n) in DROPPED.get(role, ())}
    changed = {}
    if role == "skipv1":  # v_proj keeps only the rows of the layer's own value heads
        rows = len(cfg.skipv1_own_heads[layer]) * cfg.head_dim
        changed = {n: (rows, *s[1:]) for n, s in source.items() if module_of(n) == "v_proj"}
    kept = {n: s for n, s in source.items() if n not in dropped and n not in changed}
    return LayerTensors(kept, changed, _added(cfg, layer, role), dropped)


def _added(cfg: KVLayout, layer: int, role: str) -> dict[str, Shape]:
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    if role == "fused":  # a key gate holds one value per RoPE pair (FusedAttention.key_gate)
        return {name: (kv, d // 2 if name.startswith("key") else d) for name in FUSED_GATE_INIT}
    if role != "commonkv":
        return {}
    group = cfg.commonkv_group(layer)
    rank = cfg.commonkv_ranks[group]
    added = {"kv_down.weight": (rank, cfg.hidden_size)} if layer == cfg.commonkv_groups[group][0] else {}
    added["kv_up.weight"] = (2 * kv * d, rank)
    if cfg.qkv_bias:  # the source's k/v biases become the up-projection's bias
        added["kv_up.bias"] = (2 * kv * d,)
    return added


def source_shapes(cfg: KVLayout) -> dict[str, Shape]:
    """Every tensor a Llama/Mistral/Qwen2/Qwen3 checkpoint of this config must hold, with its shape."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    attention = source_attention(cfg)
    for i in range(cfg.num_hidden_layers):
        shapes.update((attn_key(i, name), shape) for name, shape in attention.items())
        for name, shape in {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}.items():
            shapes[layer_key(i, "mlp", f"{name}.weight")] = shape
            if cfg.mlp_bias:
                shapes[layer_key(i, "mlp", f"{name}.bias")] = shape[:1]
        shapes[layer_key(i, "input_layernorm.weight")] = (h,)
        shapes[layer_key(i, "post_attention_layernorm.weight")] = (h,)
    return shapes


def target_shapes(cfg: KVLayout) -> dict[str, Shape]:
    """Every tensor of the converted checkpoint with its shape, in the order the plan writes them:
    the source's, less what each layer drops and with what it changes, then what each layer adds."""
    layers = [layer_tensors(cfg, i) for i in range(cfg.num_hidden_layers)]
    shapes = {}
    for key, shape in source_shapes(cfg).items():
        where = attn_name(key)
        if where is None:
            shapes[key] = shape
        elif where[1] not in layers[where[0]].dropped:
            shapes[key] = layers[where[0]].changed.get(where[1], shape)
    for i, tensors in enumerate(layers):
        shapes.update((attn_key(i, name), shape) for name, shape in tensors.added.items())
    return shapes


def adapting_modules(cfg: KVLayout, layer: int) -> tuple[str, ...]:
    """The attention modules of a layer that reconstruct fits and uptrain warms up first (ADAPTING)."""
    return ADAPTING.get(cfg.layer_role(layer), ())


def adapts(cfg: KVLayout, key: str, whole_layer: bool = False) -> bool:
    """Whether a parameter (its full name) is one through which its layer adapts (ADAPTING); with
    whole_layer, any parameter of a converted layer (its MLP and norms too)."""
    parts = key.split(".")
    if whole_layer:
        return len(parts) > 3 and parts[:2] == ["model", "layers"] and bool(adapting_modules(cfg, int(parts[2])))
    where = attn_name(key)
    return where is not None and module_of(where[1]) in adapting_modules(cfg, where[0])
