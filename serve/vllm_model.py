"""vLLM model for converted checkpoints (``architectures: ["SharedKVForCausalLM"]``).

The layer roles and the arithmetic are the project's own (``SharedKVConfig.layer_role``); every
piece that does not touch K/V is vLLM's Llama (decoder layer, MLP, norms, rotary, embeddings). Each
layer owns a cache vLLM allocates only where the layout stores something:

* ``store``: vLLM's ``LlamaAttention``, its own paged K/V and vLLM's attention kernel.
* ``lite`` / ``fused`` (FusedKV-Lite, FusedKV top layers): no cache; they read the bottom and middle
  layers' caches. vLLM's ``kv_sharing_target_layer_name`` names one target layer whose K *and* V a
  layer reuses, so it cannot express keys from one layer and values from another, nor a gated mix.
* ``skipv1`` (layers >= 1): one cache of kv_heads key slots and own-head value slots per token;
  the other value heads are read from layer 0's cache.
* ``commonkv``: the group's first layer caches one pre-RoPE latent of its rank per token; every
  layer of the group rebuilds its K/V from it and rotates the keys at their positions.

Layers without vLLM's attention gather each request's tokens from the paged caches and attend in
plain torch (``paged.py``), so the model runs eagerly (no torch.compile) and reads the CPU
backend's cache layout.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.torch_utils import get_dtype_size

from models.configuration_sharedkv import SharedKVConfig

from . import paged

# checkpoint names vLLM's Llama layers hold stacked: (stacked parameter, checkpoint name, shard)
STACKED = ((".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1))


def attention_name(layer_idx: int) -> str:
    """Name of a storage layer's vLLM attention (its cache and its metadata)."""
    return f"model.layers.{layer_idx}.self_attn.attn"


class PackedCache(Attention):
    """A cache vLLM allocates and pages like a layer's K/V, of ``slots`` head slots of ``features``
    values per token. Its layer writes and reads it itself; vLLM never runs attention on it."""

    def __init__(self, slots: int, features: int, head_dim: int, cache_config, prefix: str):
        super().__init__(1, head_dim, 1.0, num_kv_heads=1, cache_config=cache_config, prefix=prefix)
        self.slots, self.features = slots, features

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        spec = super().get_kv_cache_spec(vllm_config)
        return replace(spec, num_head_slots=self.slots, state_content_bytes=self.features * get_dtype_size(spec.dtype))


class SharedAttention(nn.Module):
    """Queries and output of a layer that reads K/V vLLM's attention cannot; ``attend`` says how.
    Takes LlamaAttention's arguments, so vLLM's ``LlamaDecoderLayer`` builds it."""

    metadata_layer: str  # the cache whose vLLM metadata (block tables, lengths) this layer follows

    def __init__(self, config: SharedKVConfig, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "", attn_type=None):
        super().__init__()
        self.config, self.prefix = config, prefix
        self.layer_idx = extract_layer_index(prefix)
        self.head_dim, self.num_heads, self.num_kv_heads = config.head_dim, num_heads, num_kv_heads
        self.group = num_heads // num_kv_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = ReplicatedLinear(hidden_size, num_heads * self.head_dim, bias=bias, prefix=f"{prefix}.q_proj")
        self.o_proj = ReplicatedLinear(num_heads * self.head_dim, hidden_size, bias=bias_o_proj, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings,
                                   rope_parameters=getattr(config, "rope_parameters", None), is_neox_style=True)
        self.metadata_layer = attention_name(0)

    def rotate(self, positions: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """RoPE of (tokens, heads * head_dim) states at their positions."""
        return self.rotary_emb.forward_native(positions, states, None)[0]

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        queries = self.rotate(positions, self.q_proj(hidden_states)[0])
        output = torch.zeros_like(queries)  # rows past the requests' tokens (padding) stay zero
        for request in paged.requests(self.metadata_layer):
            # (tokens, heads * d) -> (kv_heads, group, tokens, d): query head h reads kv head h // group
            q = queries[request.tokens].unflatten(-1, (self.num_kv_heads, self.group, self.head_dim)).permute(1, 2, 0, 3)
            output[request.tokens] = self.attend(q, request).permute(2, 0, 1, 3).flatten(1)
        return self.o_proj(output)[0]

    def attend(self, q: torch.Tensor, request: paged.Request) -> torch.Tensor:
        """(kv_heads, group, tokens, d) queries of one request -> its attention output, same shape."""
        raise NotImplementedError


class LiteAttention(SharedAttention):
    """FusedKV-Lite top layer: the middle layer's keys, the bottom layer's values."""

    def attend(self, q, request):
        keys = paged.gather(paged.keys_values(attention_name(self.config.middle_layer))[0], request)
        values = paged.gather(paged.keys_values(attention_name(0))[1], request)
        return paged.causal_softmax(q @ keys[:, None].transpose(-1, -2), self.scale).to(values.dtype) @ values[:, None]


class FusedAttention(SharedAttention):
    """FusedKV top layer: K = a*K_0 + b*K_m, V = c*V_0 + d*V_m, attended without building them:
    q.(a*K_0 + b*K_m) = (a*q).K_0 + (b*q).K_m and P(c*V_0 + d*V_m) = c*(P V_0) + d*(P V_m)."""

    def __init__(self, config, hidden_size, num_heads, num_kv_heads, **kwargs):
        super().__init__(config, hidden_size, num_heads, num_kv_heads, **kwargs)
        pairs, dims = (num_kv_heads, self.head_dim // 2), (num_kv_heads, self.head_dim)
        self.key_gate_bottom = nn.Parameter(torch.empty(pairs), requires_grad=False)
        self.key_gate_middle = nn.Parameter(torch.empty(pairs), requires_grad=False)
        self.value_gate_bottom = nn.Parameter(torch.empty(dims), requires_grad=False)
        self.value_gate_middle = nn.Parameter(torch.empty(dims), requires_grad=False)

    def attend(self, q, request):
        # gates broadcast over (kv_heads, group, tokens, d); a key gate holds one value per RoPE pair
        a, b = (torch.cat((g, g), -1)[:, None, None] for g in (self.key_gate_bottom, self.key_gate_middle))
        c, d = (g[:, None, None] for g in (self.value_gate_bottom, self.value_gate_middle))
        k0, v0 = (paged.gather(t, request)[:, None] for t in paged.keys_values(attention_name(0)))
        km, vm = (paged.gather(t, request)[:, None]
                  for t in paged.keys_values(attention_name(self.config.middle_layer)))
        scores = (q * a) @ k0.transpose(-1, -2) + (q * b) @ km.transpose(-1, -2)
        probs = paged.causal_softmax(scores, self.scale).to(v0.dtype)
        return c * (probs @ v0) + d * (probs @ vm)


class SkipV1Attention(SharedAttention):
    """SkipV1Former layer >= 1: own keys and own value heads, cached together (kv_heads key slots,
    then one slot per own value head); the other value heads are layer 0's."""

    def __init__(self, config, hidden_size, num_heads, num_kv_heads, bias=False, cache_config=None, prefix="", **kwargs):
        super().__init__(config, hidden_size, num_heads, num_kv_heads, bias=bias, cache_config=cache_config,
                         prefix=prefix, **kwargs)
        own = config.skipv1_own_heads[self.layer_idx]
        kv_width = num_kv_heads * self.head_dim
        self.k_proj = ReplicatedLinear(hidden_size, kv_width, bias=bias, prefix=f"{prefix}.k_proj")
        self.v_proj = ReplicatedLinear(hidden_size, len(own) * self.head_dim, bias=bias, prefix=f"{prefix}.v_proj")
        self.cache = PackedCache(num_kv_heads + len(own), self.head_dim, self.head_dim, cache_config, f"{prefix}.cache")
        # value head h: own value slot own.index(h), else layer 0's head h (after the own ones)
        self.register_buffer("value_order", torch.tensor([own.index(h) if h in own else len(own) + h
                                                          for h in range(num_kv_heads)]), persistent=False)
        self.metadata_layer = self.cache.layer_name

    def forward(self, positions, hidden_states):
        keys = self.rotate(positions, self.k_proj(hidden_states)[0]).unflatten(-1, (-1, self.head_dim))
        own_values = self.v_proj(hidden_states)[0].unflatten(-1, (-1, self.head_dim))
        paged.write(self.cache.kv_cache, torch.cat((keys, own_values), 1), self.cache.layer_name)
        return super().forward(positions, hidden_states)

    def attend(self, q, request):
        cached = paged.gather(self.cache.kv_cache, request)
        first_values = paged.gather(paged.keys_values(attention_name(0))[1], request)
        keys = cached[: self.num_kv_heads, None]
        values = torch.cat((cached[self.num_kv_heads :], first_values))[self.value_order, None]
        return paged.causal_softmax(q @ keys.transpose(-1, -2), self.scale).to(values.dtype) @ values


class CommonKVAttention(SharedAttention):
    """CommonKV: the group's first layer caches ``kv_down`` of its input (rank r, before RoPE); every
    layer of the group maps the cached latent back with its own ``kv_up`` and rotates the keys at
    their cache positions, as the transformers model does."""

    def __init__(self, config, hidden_size, num_heads, num_kv_heads, cache_config=None, prefix="", **kwargs):
        super().__init__(config, hidden_size, num_heads, num_kv_heads, cache_config=cache_config, prefix=prefix, **kwargs)
        group = config.commonkv_group(self.layer_idx)
        self.anchor = config.commonkv_groups[group][0]
        rank = config.commonkv_ranks[group]
        self.kv_up = ReplicatedLinear(rank, 2 * num_kv_heads * self.head_dim, bias=config.qkv_bias, prefix=f"{prefix}.kv_up")
        if self.layer_idx == self.anchor:
            self.kv_down = ReplicatedLinear(hidden_size, rank, bias=False, prefix=f"{prefix}.kv_down")
            self.cache = PackedCache(1, rank, self.head_dim, cache_config, f"{prefix}.cache")
        self.metadata_layer = f"model.layers.{self.anchor}.self_attn.cache"

    def forward(self, positions, hidden_states):
        if self.layer_idx == self.anchor:
            paged.write(self.cache.kv_cache, self.kv_down(hidden_states)[0][:, None], self.cache.layer_name)
        return super().forward(positions, hidden_states)

    def attend(self, q, request):
        latent = paged.gather(paged.cache_of(self.metadata_layer), request)[0]
        keys, values = self.kv_up(latent)[0].chunk(2, -1)
        keys = self.rotate(torch.arange(request.context, device=keys.device), keys)
        keys, values = (t.unflatten(-1, (self.num_kv_heads, 1, self.head_dim)).permute(1, 2, 0, 3) for t in (keys, values))
        return paged.causal_softmax(q @ keys.transpose(-1, -2), self.scale).to(values.dtype) @ values


ATTENTION = {"store": LlamaAttention, "lite": LiteAttention, "fused": FusedAttention, "skipv1": SkipV1Attention,
             "commonkv": CommonKVAttention}


class SharedKVModel(nn.Module):
    def __init__(self, vllm_config: VllmConfig, config: SharedKVConfig, prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(vllm_config, prefix=f"{prefix}.layers.{i}", config=config,
                              attn_layer_type=ATTENTION[config.layer_role(i)])
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, inputs_embeds=None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        return self.norm(hidden_states, residual)[0]


class SharedKVForCausalLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        config = hf_config if isinstance(hf_config, SharedKVConfig) else SharedKVConfig(**hf_config.to_dict())
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            raise ValueError("shared-KV checkpoints are served on one device (tensor and pipeline parallel size 1)")
        if config.qk_norm:
            raise ValueError(f"serving {config.source_model_type} conversions (q/k norms) is not supported")
        self.config = config
        self.model = SharedKVModel(vllm_config, config, prefix="model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            for stacked, checkpoint_name, shard in STACKED:
                target = name.replace(checkpoint_name, stacked)
                if checkpoint_name in name and target in params:
                    params[target].weight_loader(params[target], tensor, shard)
                    break
            else:
                target = name
                getattr(params[target], "weight_loader", default_weight_loader)(params[target], tensor)
            loaded.add(target)
        return loaded
