"""Which layer caches what: the arithmetic of every shared-KV layout, in plain Python.

``SharedKVConfig`` (a transformers config) mixes ``KVLayout`` in; the converter plans a copy
conversion with it too, without importing transformers or torch (their config classes alone
take seconds to import, longer than copying a few GB). This file is copied into every converted
checkpoint beside ``configuration_sharedkv.py``, which imports it.

Layouts (layers numbered from 0, L = num_hidden_layers):

* ``fusedkv`` (arXiv 2512.03870): layers ``0..n-1`` store K/V (n = ``num_storage_layers``,
  default ceil(L/2): with odd L the extra layer stores, so never fewer layers store than reuse).
  Each top layer ``i >= n`` has no k/v projection and attends with
  ``K_i = a_i*K_0 + b_i*K_m``, ``V_i = c_i*V_0 + d_i*V_m`` on post-RoPE keys, m = n - 1.
* ``fusedkv_lite``: top layers use ``K_m`` and ``V_0`` as they are.
* ``skipv1`` (arXiv 2510.16807): layer 0 computes all value heads; each layer l >= 1 computes
  only its own value heads ``skipv1_own_heads[l]`` and takes the other heads from layer 0.
* ``commonkv`` (arXiv 2508.16134): layers form groups of ``commonkv_group_size`` adjacent layers
  (default floor(1 / ``commonkv_ratio``)); each group caches one pre-RoPE latent of width
  ``commonkv_ranks[g]``, and every layer of the group rebuilds its K and V from it. The ranks
  add up to ``commonkv_ratio`` of the source's cached K/V widths (capped at what SVD can use).
"""
from __future__ import annotations

import math

LAYOUTS = ("fusedkv", "fusedkv_lite", "skipv1", "commonkv")
SUPPORTED_SOURCE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# What a family's attention adds to Llama's, as the layout fields that say so: Qwen2 has biases on
# q/k/v but not on o (Llama's attention_bias covers all four), Qwen3 a per-head RMSNorm of queries
# and keys before RoPE.
FAMILY_FIELDS = {"qwen2": {"qkv_bias": True, "attention_bias": False}, "qwen3": {"qk_norm": True}}
MIXTURE_OF_EXPERTS_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# RoPE variants transformers' Llama rotary embedding computes (rope_parameters' rope_type); each
# keeps every pair (j, j + head_dim/2) rotating together, which FusedKV's key gates rely on.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# A converted config.json's model_type. AutoTokenizer reads config.json first and, for a type
# transformers does not know, stops to ask whether to run the folder's code; as "llama" the
# tokenizer loads without remote code, while AutoModelForCausalLM with trust_remote_code=True
# still takes auto_map's classes (without it transformers builds a plain Llama and lists the
# missing k/v weights).
MODEL_TYPE = "llama"
# what set_layout stores: the fields a converted config.json adds to the source's
LAYOUT_FIELDS = ("kv_layout", "source_model_type", "qkv_bias", "qk_norm", "num_storage_layers", "skipv1_own_heads",
                 "commonkv_ratio", "commonkv_group_size", "commonkv_ranks")
# source config keys that describe the source file, not the model
NOT_MODEL_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config",
                    "torch_dtype", "dtype")
# FusedKV's gates at their copy initialization: keys from the middle layer, values from the bottom
# one, which is FusedKV-Lite. The model starts there and the converter writes these values.
FUSED_GATE_INIT = {"key_gate_bottom": 0.0, "key_gate_middle": 1.0, "value_gate_bottom": 1.0, "value_gate_middle": 0.0}


def source_fields(fields: dict, model_type: str | None) -> dict:
    """A supported source config's fields (a dict) as the shared-KV config takes them: everything
    that describes the model kept (RoPE scaling included), sliding windows and RoPE variants Llama's
    rotary embedding lacks refused, the family's attention extras made explicit (FAMILY_FIELDS)."""
    supported = ", ".join(SUPPORTED_SOURCE_TYPES)
    if model_type in MIXTURE_OF_EXPERTS_TYPES:
        raise ValueError(f"mixture-of-experts sources ({model_type}) are not supported; supported: {supported}")
    if model_type not in SUPPORTED_SOURCE_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {supported}")
    if "kv_layout" in fields:  # a converted checkpoint says "llama" too (MODEL_TYPE)
        raise ValueError(f"this checkpoint is already converted ({fields['kv_layout']}); convert its source instead")
    fields = {k: v for k, v in fields.items() if k not in NOT_MODEL_FIELDS}
    if model_type == "mistral" and fields.get("sliding_window") is not None:
        raise ValueError("Mistral with a sliding window is not supported (set sliding_window to null)")
    if fields.get("use_sliding_window"):
        raise ValueError(f"{model_type} with use_sliding_window=true (sliding-window attention) is not supported")
    # a config.json older than transformers 5 names it rope_scaling; the config class reads both
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    fields.update(FAMILY_FIELDS.get(model_type, {}))
    fields.pop("layer_types", None)  # sliding layers are refused above, so all layers are full attention
    fields.pop("sliding_window", None)
    if fields.get("head_dim") is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return fields


class KVLayout:
    """The layout fields and what follows from them. Mixed into a class that already has the
    source's num_hidden_layers, num_key_value_heads, head_dim, hidden_size and attention_bias."""

    def set_layout(
        self,
        kv_layout: str = "fusedkv",
        num_storage_layers: int | None = None,
        skipv1_own_heads: list[list[int]] | None = None,
        commonkv_ratio: float = 0.5,
        commonkv_group_size: int | None = None,
        commonkv_ranks: list[int] | None = None,
        qkv_bias: bool | None = None,
        qk_norm: bool = False,
        source_model_type: str = "llama",
    ) -> None:
        """Check the layout fields and store them, each default resolved (ValueError on bad ones)."""
        if kv_layout not in LAYOUTS:
            raise ValueError(f"unknown kv_layout {kv_layout!r}; choose one of {', '.join(LAYOUTS)}")
        layers, kv_heads = self.num_hidden_layers, self.num_key_value_heads
        if layers < 2:
            raise ValueError(f"cross-layer KV sharing needs at least 2 layers, got {layers}")
        self.kv_layout = kv_layout
        self.source_model_type = source_model_type
        # unset: Llama's (and Qwen3's) attention_bias covers q/k/v as well as o; Qwen2 sets it (FAMILY_FIELDS)
        self.qkv_bias = bool(self.attention_bias) if qkv_bias is None else bool(qkv_bias)
        self.qk_norm = bool(qk_norm)

        n = math.ceil(layers / 2) if num_storage_layers is None else int(num_storage_layers)
        if not 1 <= n <= layers:
            raise ValueError(f"num_storage_layers must be in 1..{layers}, got {n}")
        self.num_storage_layers = n

        if skipv1_own_heads is None:
            own = list(range(kv_heads // 2))
            skipv1_own_heads = [list(range(kv_heads))] + [own for _ in range(layers - 1)]
        skipv1_own_heads = [sorted(int(h) for h in heads) for heads in skipv1_own_heads]
        if len(skipv1_own_heads) != layers or skipv1_own_heads[0] != list(range(kv_heads)):
            raise ValueError("skipv1_own_heads needs one entry per layer, and layer 0 owns every value head")
        for heads in skipv1_own_heads:
            if len(set(heads)) != len(heads) or any(not 0 <= h < kv_heads for h in heads):
                raise ValueError(f"skipv1_own_heads entries must be distinct heads in 0..{kv_heads - 1}")
        self.skipv1_own_heads = skipv1_own_heads

        if not 0 < commonkv_ratio <= 1:
            raise ValueError(f"commonkv_ratio must be in (0, 1], got {commonkv_ratio}")
        self.commonkv_ratio = float(commonkv_ratio)
        # A group pays off once its share of the budget is at most one layer's K/V; at ratio 1 every
        # layer is its own group, which is what makes the full-rank conversion exact.
        size = max(1, math.floor(1 / commonkv_ratio + 1e-9)) if commonkv_group_size is None else int(commonkv_group_size)
        if not 1 <= size <= layers:
            raise ValueError(f"commonkv_group_size must be in 1..{layers}, got {size}")
        self.commonkv_group_size = size
        caps = self.commonkv_rank_caps
        if commonkv_ranks is None:  # uniform per layer; conversion sets them from hidden-state similarity
            commonkv_ranks = allocate_ranks(self.commonkv_budget, [len(g) for g in self.commonkv_groups], caps)
        commonkv_ranks = [int(r) for r in commonkv_ranks]
        if len(commonkv_ranks) != len(caps) or any(not 1 <= r <= c for r, c in zip(commonkv_ranks, caps)):
            raise ValueError(f"commonkv_ranks needs one rank per group, each in 1..its cap {caps}, got {commonkv_ranks}")
        self.commonkv_ranks = commonkv_ranks

    def layout_fields(self) -> dict:
        return {name: getattr(self, name) for name in LAYOUT_FIELDS}

    # --- which layer does what (derived, never stored twice) ---------------------------------
    @property
    def middle_layer(self) -> int:
        return self.num_storage_layers - 1

    @property
    def commonkv_groups(self) -> list[list[int]]:
        """Adjacent layers in groups of commonkv_group_size (the last one may be shorter)."""
        n, size = self.num_hidden_layers, self.commonkv_group_size
        return [list(range(start, min(start + size, n))) for start in range(0, n, size)]

    @property
    def commonkv_rank_caps(self) -> list[int]:
        """A group's latent can use at most the rank of its stacked K/V weights: min(hidden, 2*size*kv_width)."""
        kv_width = self.num_key_value_heads * self.head_dim
        return [min(self.hidden_size, 2 * len(g) * kv_width) for g in self.commonkv_groups]

    @property
    def commonkv_budget(self) -> int:
        """Latent width all groups share: commonkv_ratio of the source's cached K/V width per token."""
        return round(self.commonkv_ratio * dense_kv_elements_per_token(self))

    def commonkv_group(self, layer_idx: int) -> int:
        return layer_idx // self.commonkv_group_size

    def layer_role(self, layer_idx: int) -> str:
        """'store', 'fused', 'lite', 'skipv1' or 'commonkv': which attention class the layer uses."""
        if self.kv_layout == "commonkv":
            return "commonkv"
        if self.kv_layout == "skipv1":
            return "store" if layer_idx == 0 else "skipv1"
        if layer_idx < self.num_storage_layers:
            return "store"
        return "fused" if self.kv_layout == "fusedkv" else "lite"

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """transformers' cache builds a no-storage DummyLayer for every 'reuse' layer (CommonKV: all
        but the first layer of each group, which caches the group's latent)."""
        if self.kv_layout == "commonkv":
            return [None if i % self.commonkv_group_size == 0 else "reuse" for i in range(self.num_hidden_layers)]
        return ["reuse" if self.layer_role(i) in ("fused", "lite") else None for i in range(self.num_hidden_layers)]

    def kv_cache_bytes_per_token(self, bytes_per_element: int) -> int:
        """KV-cache bytes one token costs (batch 1), from the layout arithmetic alone."""
        if self.kv_layout == "commonkv":
            return sum(self.commonkv_ranks) * bytes_per_element
        head_bytes = self.head_dim * bytes_per_element
        total_heads = 0
        for i in range(self.num_hidden_layers):
            role = self.layer_role(i)
            if role == "store":
                total_heads += 2 * self.num_key_value_heads
            elif role == "skipv1":
                total_heads += self.num_key_value_heads + len(self.skipv1_own_heads[i])
        return total_heads * head_bytes


def dense_kv_elements_per_token(config) -> int:
    """K/V elements one token costs (batch 1) when every layer caches its own K and V, as the
    source does: 2 * layers * kv_heads * head_dim. Any Llama-family config (head_dim may be unset)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim


def kv_bytes_per_token(config, bytes_per_element: int) -> int:
    """KV-cache bytes one token costs (batch 1) by the config's arithmetic: its layout's, or the
    dense cache of a model without one (a source, the control arm)."""
    if hasattr(config, "kv_cache_bytes_per_token"):
        return config.kv_cache_bytes_per_token(bytes_per_element)
    return dense_kv_elements_per_token(config) * bytes_per_element


def allocate_ranks(budget: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split an integer budget in proportion to weights, every share in 1..its cap.

    One unit each is set aside first; the rest is water-filled: shares that reach their cap are
    fixed there and what is left is split again among the others. Integers by largest remainder,
    so the shares sum to the budget clipped to [len(caps), sum(caps)].
    """
    n = len(caps)
    budget = max(n, min(int(budget), sum(caps)))
    room = [c - 1 for c in caps]
    shares = [0.0] * n
    free, left = [i for i in range(n) if room[i] > 0], float(budget - n)
    while free:
        total = sum(weights[i] for i in free)
        share = {i: left * weights[i] / total for i in free}
        capped = [i for i in free if share[i] >= room[i]]
        for i in capped or free:
            shares[i] = float(room[i]) if capped else share[i]
        if not capped:
            break
        left -= sum(room[i] for i in capped)
        free = [i for i in free if i not in capped]
    ranks = [1 + math.floor(s) for s in shares]
    by_remainder = sorted(range(n), key=lambda i: math.floor(shares[i]) - shares[i])
    for i in by_remainder[: budget - sum(ranks)]:
        ranks[i] += 1
    return ranks
