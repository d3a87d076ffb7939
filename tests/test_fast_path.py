"""The GPU fast path's choice (uptrain/fast_path.py) on the CPU: nothing changes on a CPU; without
liger-kernel one line says so and the plain path runs; a kernel that raises or disagrees is left
out and the rest are put in. Liger's Triton kernels need a GPU, so the kernels here are stand-ins
in plain torch with Liger's call signatures, and the CPU is let through as if it were one."""
import copy
import sys
import types

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

import models.modeling_sharedkv as modeling_sharedkv
from models import SharedKVForCausalLM
from models.source_layout import shared_kv_config
from uptrain import fast_path, loss as uptrain_loss


def rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=True):
    return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotary(q, k, cos, sin, *args):
    return tuple(x * cos.unsqueeze(1) + modeling_llama.rotate_half(x) * sin.unsqueeze(1) for x in (q, k))


class FusedCrossEntropy(torch.nn.Module):
    calls = 0

    def __init__(self, ignore_index=-100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, weight, hidden, labels, bias=None):
        FusedCrossEntropy.calls += 1
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=self.ignore_index)


def fake_liger(monkeypatch, silu_mul, rope):
    """liger_kernel's names that uptrain/fast_path.py calls, in plain torch, for this test's process."""
    package, ops, transformers_, rope_module = (types.ModuleType(name) for name in (
        "liger_kernel", "liger_kernel.ops", "liger_kernel.transformers", "liger_kernel.transformers.rope"))
    ops.LigerRMSNormFunction = types.SimpleNamespace(apply=rms_norm)
    ops.LigerSiLUMulFunction = types.SimpleNamespace(apply=silu_mul)
    transformers_.LigerFusedLinearCrossEntropyLoss = FusedCrossEntropy
    rope_module.liger_rotary_pos_emb = rope
    for module in (package, ops, transformers_, rope_module):
        monkeypatch.setitem(sys.modules, module.__name__, module)


@pytest.fixture
def as_if_on_a_gpu(monkeypatch):
    monkeypatch.setattr(fast_path, "FAST_DEVICES", ("cuda", "cpu"))
    for module, name in ((modeling_sharedkv, "rope"), (modeling_llama, "apply_rotary_pos_emb")):
        monkeypatch.setattr(module, name, getattr(module, name))  # enable() replaces them: restored after the test


def tiny_fusedkv():
    torch.manual_seed(0)
    source = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    source._attn_implementation = "sdpa"
    return SharedKVForCausalLM(shared_kv_config(source, "fusedkv")).train()


def module_classes(model):
    return [type(m) for m in model.modules()]


def lm_loss_and_grads(model, batch):
    """uptrain's own loss path (train.batch_loss without an engine) and every parameter's gradient."""
    model.zero_grad()
    lm, _ = uptrain_loss.chunked_losses(uptrain_loss.final_hidden_states(model, batch), model.get_output_embeddings(), batch)
    lm.backward()
    return lm.item(), [p.grad.clone() for p in model.parameters()]


def test_on_a_cpu_and_with_kernels_plain_nothing_changes():
    model = tiny_fusedkv()
    before = module_classes(model)
    assert fast_path.enable(model, "auto", 2, "lm", torch.float32) is None
    assert fast_path.enable(model, "plain", 2, "lm", torch.float32) is None
    assert module_classes(model) == before


def test_without_liger_kernel_one_line_says_so_and_the_model_is_plain(monkeypatch, as_if_on_a_gpu):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as where it is not installed: import fails
    model = tiny_fusedkv()
    before = module_classes(model)
    line = fast_path.enable(model, "auto", 2, "lm", torch.float32)
    assert line.startswith("fast path: liger-kernel cannot be imported (") and line.endswith("); plain PyTorch kernels")
    assert module_classes(model) == before and modeling_sharedkv.rope is fast_path.PLAIN_ROPE


def test_kernels_that_raise_or_disagree_are_left_out_and_the_rest_give_the_same_loss(monkeypatch, as_if_on_a_gpu):
    def raises(a, b):
        raise TypeError("silu_mul() takes 4 arguments")

    def unrotated(q, k, cos, sin, *args):
        return q * 1.0, k * 1.0

    fake_liger(monkeypatch, silu_mul=raises, rope=unrotated)
    model = tiny_fusedkv()
    plain = copy.deepcopy(model)
    line = fast_path.enable(model, "auto", 2, "lm", torch.float32)
    assert line == ("fast path: Liger RMSNorm, fused linear cross-entropy; plain PyTorch for SwiGLU (TypeError: "
                    "silu_mul() takes 4 arguments), RoPE (disagrees with PyTorch); fused AdamW")
    kinds = module_classes(model)
    assert fast_path.FastRMSNorm in kinds and modeling_llama.LlamaRMSNorm not in kinds
    assert modeling_llama.LlamaMLP in kinds and fast_path.FastMLP not in kinds
    assert type(model.get_output_embeddings()) is fast_path.FusedLossHead
    assert modeling_sharedkv.rope is fast_path.PLAIN_ROPE

    batch = torch.randint(0, 256, (2, 16))
    calls = FusedCrossEntropy.calls
    fast_loss, fast_grads = lm_loss_and_grads(model, batch)
    assert FusedCrossEntropy.calls == calls + 1  # uptrain's loss went through the fused output layer
    plain_loss, plain_grads = lm_loss_and_grads(plain, batch)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    for fast, slow in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("zero_stage,loss", [(3, "lm"), (2, "lm+kd")])
def test_zero3_and_kd_keep_the_chunked_loss(monkeypatch, as_if_on_a_gpu, zero_stage, loss):
    fake_liger(monkeypatch, silu_mul=lambda a, b: torch.nn.functional.silu(a) * b, rope=rotary)
    model = tiny_fusedkv()
    line = fast_path.enable(model, "auto", zero_stage, loss, torch.float32)
    assert line.startswith("fast path: Liger RMSNorm, SwiGLU, RoPE; plain PyTorch for fused linear cross-entropy (")
    assert type(model.get_output_embeddings()) is torch.nn.Linear and modeling_sharedkv.rope is fast_path.liger_rope
