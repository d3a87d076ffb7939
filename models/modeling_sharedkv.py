"""Llama-family decoders with cross-layer KV sharing: FusedKV, FusedKV-Lite, SkipV1Former, CommonKV.

Every piece that does not touch K/V (embeddings, norms, MLP, rotary) is Llama's. Attention is
one small class per layer role; ``ATTENTION_CLASSES`` maps the config's ``layer_role`` to it.

Within one forward pass, layers that store K/V publish their full-length (cache-updated,
post-RoPE) keys and values in ``shared_kv``; the layers above read them from there. This is
the idiom of transformers' shared-KV models (Gemma-3n): it is the same code path with and
without a cache, so incremental decoding equals a full forward by construction. Reusing
layers hold a ``DummyLayer`` in the cache (see ``SharedKVConfig.kv_sharing_modes``), and
SkipV1 layers cache only their own value heads, so the cache really holds only what is stored.
CommonKV caches one pre-RoPE latent per group of layers (see ``CommonKVAttention``).
Qwen3's per-head RMSNorm of queries and keys before RoPE (``config.qk_norm``) sits where Qwen3 has
it: every layer normalizes its queries, and every layer that makes keys (CommonKV: rebuilds them
from the latent) normalizes those; layers that reuse another layer's keys reuse them normalized.

This file is copied into every converted checkpoint, so it imports only torch and transformers.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)

from .configuration_sharedkv import SharedKVConfig
from .kv_layout import FUSED_GATE_INIT

SharedKV = dict[int, tuple[torch.Tensor, torch.Tensor | None]]  # CommonKV publishes (latent, None)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, heads, seq, head_dim) states; cos/sin are (batch, seq, head_dim)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def head_norm(config: SharedKVConfig) -> nn.Module:
    """Qwen3's RMSNorm over each query or key head (q_norm, k_norm); the other families have none."""
    return LlamaRMSNorm(config.head_dim, eps=config.rms_norm_eps) if config.qk_norm else nn.Identity()


class SharedKVAttention(nn.Module):
    """The query side every role shares; subclasses say where keys and values come from."""

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=config.qkv_bias)
        self.q_norm = head_norm(config)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=config.attention_bias)
        # The K/V substitution hook: a module set here is called as
        # kv_substitute(self, hidden_states, cos, sin, past_key_values, shared_kv) in place of
        # keys_values and returns the keys and values this layer attends to (it may call keys_values
        # itself and change what it returns). Progressive conversion blends a converted layer's source
        # K/V in through it (uptrain/blend.py). None: the layout's own K/V.
        self.kv_substitute: nn.Module | None = None

    def project(self, proj: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, heads, seq, head_dim)."""
        return proj(hidden_states).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def queries(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries; cos/sin may cover earlier positions too (CommonKV): the queries take the last ones."""
        q_len = hidden_states.shape[1]
        return rope(self.q_norm(self.project(self.q_proj, hidden_states)), cos[:, -q_len:], sin[:, -q_len:])

    def keys_values(self, hidden_states, cos, sin, past_key_values, shared_kv: SharedKV):
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        shared_kv: SharedKV | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos, sin = position_embeddings
        query_states = self.queries(hidden_states, cos, sin)
        make_kv = self.keys_values if self.kv_substitute is None else partial(self.kv_substitute, self)
        key_states, value_states = make_kv(hidden_states, cos, sin, past_key_values, shared_kv)
        attn_output, attn_weights = self.attention(query_states, key_states, value_states, attention_mask, **kwargs)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def attention(self, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(batch, heads, q, d) queries on (batch, kv_heads, k, d) keys and values -> (batch, q, heads, d)."""
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = 0.0 if not self.training else self.attention_dropout
        return interface(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)


class StorageAttention(SharedKVAttention):
    """An ordinary layer: computes, caches and publishes its own K/V."""

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        kv_width = self.num_kv_heads * self.head_dim
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)
        self.k_norm = head_norm(config)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)

    def keys_values(self, hidden_states, cos, sin, past_key_values, shared_kv):
        key_states = rope(self.k_norm(self.project(self.k_proj, hidden_states)), cos, sin)
        value_states = self.project(self.v_proj, hidden_states)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        shared_kv[self.layer_idx] = (key_states, value_states)
        return key_states, value_states


class FusedAttention(SharedKVAttention):
    """FusedKV top layer: K = a*K_0 + b*K_m, V = c*V_0 + d*V_m on post-RoPE keys.

    A key gate holds head_dim/2 values and is used twice, once for each half, so the gate is
    equal on both members of every RoPE pair (j, j + head_dim/2): a rotation commutes with a
    scalar per pair, so q.k stays a function of relative position only.
    """

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.middle = config.middle_layer
        # key_gate_bottom, key_gate_middle, value_gate_bottom, value_gate_middle (a, b, c, d), starting
        # as FusedKV-Lite: keys from the middle layer, values from the bottom one.
        for name, value in FUSED_GATE_INIT.items():
            width = self.head_dim // 2 if name.startswith("key") else self.head_dim
            self.register_parameter(name, nn.Parameter(torch.full((self.num_kv_heads, width), value)))

    def reset_gates(self) -> None:
        """Back to the FusedKV-Lite start (FUSED_GATE_INIT)."""
        with torch.no_grad():
            for name, value in FUSED_GATE_INIT.items():
                getattr(self, name).fill_(value)

    @staticmethod
    def key_gate(half: torch.Tensor) -> torch.Tensor:
        return torch.cat((half, half), dim=-1)[None, :, None, :]

    def gates(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(a, b, c, d) shaped to broadcast over (batch, kv_heads, tokens, head_dim), in ``dtype``."""
        gates = (self.key_gate(self.key_gate_bottom), self.key_gate(self.key_gate_middle),
                 self.value_gate_bottom[None, :, None], self.value_gate_middle[None, :, None])
        return tuple(g.to(dtype) for g in gates)

    def keys_values(self, hidden_states, cos, sin, past_key_values, shared_kv):
        (k0, v0), (km, vm) = shared_kv[0], shared_kv[self.middle]
        return self.fuse(k0, km, v0, vm, *self.gates(k0.dtype))

    @staticmethod
    def fuse(k0, km, v0, vm, a, b, c, d):
        """The fused K and V from the bottom and middle layers' K and V and the gates."""
        return a * k0 + b * km, c * v0 + d * vm

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                shared_kv=None, **kwargs):
        # one new token on a cache, and no substitute that needs the fused K/V themselves
        if past_key_values is not None and hidden_states.shape[1] == 1 and self.kv_substitute is None:
            return self.decode_step(hidden_states, position_embeddings, attention_mask, shared_kv)
        return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, shared_kv, **kwargs)

    def decode_step(self, hidden_states, position_embeddings, attention_mask, shared_kv):
        """One new token, attending to the bottom and middle caches without building the fused K/V.

        The gates act per feature, so q.(a*K_0 + b*K_m) = (a*q).K_0 + (b*q).K_m and
        P (c*V_0 + d*V_m) = c*(P V_0) + d*(P V_m): each cache is read once and nothing of cache
        size is written, where fusing first reads both caches, writes the fused pair, reads it again.
        """
        cos, sin = position_embeddings
        batch = hidden_states.shape[0]
        query = self.queries(hidden_states, cos, sin)
        # (batch, heads, 1, d) -> (batch, kv_heads, group, d): query head h reads kv head h // group
        query = query.view(batch, self.num_kv_heads, self.num_key_value_groups, self.head_dim)
        (k0, v0), (km, vm) = shared_kv[0], shared_kv[self.middle]
        a, b, c, d = self.gates(k0.dtype)
        scores = ((query * a) @ k0.transpose(-1, -2)).float() + ((query * b) @ km.transpose(-1, -2)).float()
        scores = scores * self.scaling
        if attention_mask is not None:  # (batch, 1, 1, keys): boolean (sdpa) or additive (eager)
            mask = attention_mask[:, :, -1:, : k0.shape[-2]]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = scores.softmax(-1).to(v0.dtype)
        out = c * (probs @ v0) + d * (probs @ vm)
        return self.o_proj(out.reshape(batch, 1, -1)), None


class LiteAttention(SharedKVAttention):
    """FusedKV-Lite top layer: the middle layer's keys and the bottom layer's values, as they are."""

    def keys_values(self, hidden_states, cos, sin, past_key_values, shared_kv):
        return shared_kv[self.config.middle_layer][0], shared_kv[0][1]


class SkipV1Attention(SharedKVAttention):
    """SkipV1Former layer >= 1: own keys, own value heads ``skipv1_own_heads[l]``, the rest from layer 0."""

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        own = config.skipv1_own_heads[layer_idx]
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.k_norm = head_norm(config)
        self.v_proj = nn.Linear(config.hidden_size, len(own) * self.head_dim, bias=config.qkv_bias)
        # Own heads come first after the concat; head_order puts every head back at its index.
        # Plain lists, not buffers: the common case (own = first r heads) needs no index at all.
        self.num_own = len(own)
        self.reused_heads = [h for h in range(self.num_kv_heads) if h not in own]
        concat_order = own + self.reused_heads
        in_order = concat_order == sorted(concat_order)
        self.head_order = None if in_order else [concat_order.index(h) for h in range(self.num_kv_heads)]

    def keys_values(self, hidden_states, cos, sin, past_key_values, shared_kv):
        key_states = rope(self.k_norm(self.project(self.k_proj, hidden_states)), cos, sin)
        own_values = self.project(self.v_proj, hidden_states)
        if past_key_values is not None:
            key_states, own_values = past_key_values.update(key_states, own_values, self.layer_idx)
        first_values = shared_kv[0][1]
        if self.head_order is None:  # own heads are 0..r-1, layer 0's heads r.. follow
            blocks = (own_values, first_values[:, self.num_own :])
            # With a cache the values span every earlier token: attending block by block (see attention)
            # saves concatenating them at every step. Without one (training, scoring) one concatenation
            # measured faster (README, Benchmarks).
            return key_states, blocks if past_key_values is not None else torch.cat(blocks, dim=1)
        value_states = torch.cat((own_values, first_values[:, self.reused_heads]), dim=1)
        return key_states, value_states[:, self.head_order]

    def attention(self, query, key, value, attention_mask, **kwargs):
        if not isinstance(value, tuple):
            return super().attention(query, key, value, attention_mask, **kwargs)
        # Attention is separate per KV head: the own heads' queries attend with the own values, the
        # others with layer 0's, so no value tensor of cache size is concatenated at every step.
        own_values, first_values = value
        split = self.num_own * self.num_key_value_groups
        blocks = ((query[:, :split], key[:, : self.num_own], own_values),
                  (query[:, split:], key[:, self.num_own :], first_values))
        outputs = [super(SkipV1Attention, self).attention(q, k, v, attention_mask, **kwargs)
                   for q, k, v in blocks if q.shape[1]]
        weights = [w for _, w in outputs]
        return torch.cat([o for o, _ in outputs], dim=2), None if weights[0] is None else torch.cat(weights, dim=1)


class CommonKVAttention(SharedKVAttention):
    """CommonKV: the layers of a group rebuild K and V from one shared, cached latent.

    The group's first layer (its anchor) projects its input to the latent with ``kv_down``
    (rank r = ``commonkv_ranks[group]``); the cache holds only that latent, before RoPE, as one
    (batch, 1, tokens, r) "key" tensor with an empty value tensor, and the other layers of the
    group hold a ``DummyLayer``. Every layer maps the latent back with its own ``kv_up``
    (r -> K and V, the source's q/k/v bias as its bias), normalizes the key heads where the source
    does (Qwen3's k_norm), then applies RoPE to the keys at attention time, for every cached
    position: a latent cannot be rotated, since RoPE does not commute with the up-projection.
    Positions are cache indices; the model passes rotary tables for all of them and the queries
    use the last ones.

    The factors come from the paper's SVD (``convert/commonkv.py``): the group's k/v weights
    stacked, W = U S Vt, ``kv_down`` = Vt[:r] and ``kv_up`` of layer l = its rows of U S[:, :r].
    The paper merges the group's per-layer latents (mean) after prefill, which a forward pass
    cannot reproduce: layer l would need the latents of layers above it for the same token. Here
    the anchor's latent is the group's merged latent, so incremental decoding equals a full
    forward; adjacent layers' hidden states are similar (the paper's observation), so the other
    layers' own latents are close to it.
    """

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        group = config.commonkv_group(layer_idx)
        self.anchor = config.commonkv_groups[group][0]
        rank, kv_width = config.commonkv_ranks[group], self.num_kv_heads * self.head_dim
        if layer_idx == self.anchor:
            self.kv_down = nn.Linear(config.hidden_size, rank, bias=False)
        self.kv_up = nn.Linear(rank, 2 * kv_width, bias=config.qkv_bias)
        self.k_norm = head_norm(config)

    def keys_values(self, hidden_states, cos, sin, past_key_values, shared_kv):
        if self.layer_idx == self.anchor:
            latent = self.kv_down(hidden_states)[:, None]
            if past_key_values is not None:
                latent, _ = past_key_values.update(latent, latent[..., :0], self.layer_idx)
            shared_kv[self.layer_idx] = (latent, None)
        latent = shared_kv[self.anchor][0][:, 0]
        # (batch, tokens, 2 * kv_width) -> two (batch, kv_heads, tokens, head_dim)
        key_states, value_states = self.kv_up(latent).unflatten(-1, (2, self.num_kv_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return rope(self.k_norm(key_states), cos, sin), value_states


ATTENTION_CLASSES: dict[str, type[SharedKVAttention]] = {
    "store": StorageAttention,
    "fused": FusedAttention,
    "lite": LiteAttention,
    "skipv1": SkipV1Attention,
    "commonkv": CommonKVAttention,
}


class SharedKVDecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (same forward) with the attention class of this layer's role."""

    def __init__(self, config: SharedKVConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)  # skip Llama's __init__: it would build a full LlamaAttention
        self.hidden_size = config.hidden_size
        self.self_attn = ATTENTION_CLASSES[config.layer_role(layer_idx)](config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class SharedKVPreTrainedModel(LlamaPreTrainedModel):
    config_class = SharedKVConfig
    config: SharedKVConfig
    _no_split_modules = ["SharedKVDecoderLayer"]
    _supports_flash_attn = False  # flash kernels are untested with the reused, non-contiguous K/V
    _can_record_outputs = {"hidden_states": SharedKVDecoderLayer, "attentions": SharedKVAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FusedAttention):  # start as FusedKV-Lite, the copy-source initialization
            module.reset_gates()


class SharedKVModel(SharedKVPreTrainedModel, LlamaModel):
    def __init__(self, config: SharedKVConfig):
        SharedKVPreTrainedModel.__init__(self, config)  # skip LlamaModel's __init__: it builds Llama layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(SharedKVDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        commonkv = self.config.kv_layout == "commonkv"
        if position_ids is None or commonkv:  # CommonKV rotates keys by cache index (CommonKVAttention)
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        rotary_positions = torch.arange(past_seen + position_ids.shape[1], device=position_ids.device)[None] if commonkv else position_ids
        position_embeddings = self.rotary_emb(hidden_states, position_ids=rotary_positions)
        shared_kv: SharedKV = {}  # filled bottom-up by the storing layers of this forward pass
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                shared_kv=shared_kv,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class SharedKVForCausalLM(SharedKVPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    def __init__(self, config: SharedKVConfig):
        SharedKVPreTrainedModel.__init__(self, config)
        self.model = SharedKVModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
