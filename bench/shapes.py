"""Model shapes for benchmarks that need speed and memory, not weights: nothing has to travel."""
from __future__ import annotations

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)
# SmolLM2-1.7B (MHA, 1.71B parameters with its tied embedding)
SMOLLM2_1_7B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                    tie_word_embeddings=True, rope_theta=130000.0, rms_norm_eps=1e-5)
# The same kind of model small enough for a test on a CPU
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5)
# The parity study's MHA source (data/mini-sources/mha): at this size a step's fixed costs show
MINI_MHA = dict(vocab_size=4096, hidden_size=96, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-6)
SHAPES = {"smollm2-135m": SMOLLM2_135M, "smollm2-1.7b": SMOLLM2_1_7B, "tiny": TINY, "mini-mha": MINI_MHA}

# Dense bf16 tensor-core peak of each GPU we report MFU on (vendor datasheets, no sparsity).
BF16_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def random_source(max_positions: int = 8192, dtype=None, device: str = "cpu"):
    """A Llama with SmolLM2-135M's shape and random weights (speed and memory do not depend on values)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_135M, "max_position_embeddings": max_positions})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype=dtype or torch.float32, device=device).eval()


def peak_flops(gpu_name: str) -> float | None:
    return next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in gpu_name), None)
