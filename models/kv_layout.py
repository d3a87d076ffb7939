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
# A converted config.json's model_type. AutoTokenizer reads config.json first and, for a type
# transformers does not know, stops to ask whether to run the folder's code; as "llama" the
# tokenizer loads without remote code, while AutoModelForCausalLM with trust_remote_code=True
# still takes auto_map's classes (without it transformers builds a plain Llama and lists the
# missing k/v weights).
MODEL_TYPE = "llama"
# what set_layout stores: the fields a converted config.json adds to the source's
LAYOUT_FIELDS = ("kv_layout", "source_model_type", "qkv_bias", "qk_norm", "num_storage_layers", "skipv1_own_heads",
                 "commonkv_ratio", "commonkv_group_size", "commonkv_ranks")
# FusedKV's gates at their copy initialization: keys from the middle layer, values from the bottom
# one, which is FusedKV-Lite. The model starts there and the converter writes these values.
FUSED_GATE_INIT = {"key_gate_bottom": 0.0, "key_gate_middle": 1.0, "value_gate_bottom": 1.0, "value_gate_middle": 0.0}


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
        # the conversion chooses the ranks (models/source_layout.py, convert/commonkv.py); None until it has
        if commonkv_ranks is not None:
            caps = self.commonkv_rank_caps
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
