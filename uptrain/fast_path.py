"""The GPU fast path: Liger-Kernel's Triton kernels for RMSNorm, SwiGLU, RoPE and the output layer's
fused linear cross-entropy, and fused AdamW, each chosen once per training process.

On a CUDA GPU (recipe key ``kernels: auto``, the default) every Liger kernel is first run next to
the plain PyTorch path on a small input of the model's own widths and dtype, forward and backward;
a kernel that is missing, raises or disagrees is left out, and one line says what runs. An earlier
H200 run of the 1.7B shape measured 0.33 MFU without these kernels and 0.40 with them. On a CPU
nothing here is used: transformers' modules and uptrain/loss.py's chunked loss are the path.

How each kernel reaches the model, which keeps its class, parameters and state dict:

* RMSNorm, SwiGLU: the model's ``LlamaRMSNorm`` and ``LlamaMLP`` modules are re-classed to the
  subclasses below, whose forward calls Liger's function (they add no state, and ZeRO-3's hooks,
  which sit on the instances, stay).
* RoPE: the rotary function the attention code calls (transformers' ``apply_rotary_pos_emb`` for
  Llama's own attention, ``rope`` of the layouts' modeling module) is Liger's for the process.
* Fused linear cross-entropy: the output layer is re-classed to ``FusedLossHead``, which gives
  uptrain/loss.py the ``lm`` loss of a batch's final hidden states in one Liger call (the
  gradients are computed in the forward pass, a chunk at a time: no logits kept, no recompute).
  Not under ZeRO-3 (the call reads the output layer's weight, which ZeRO-3 partitions) and not for
  kd, whose teacher term stays in the chunked loss.
"""
from __future__ import annotations

import functools
import os
import sys
from types import SimpleNamespace

import torch
from torch import nn
from transformers.models.llama import modeling_llama

from models.modeling_sharedkv import rope as PLAIN_ROPE  # before enable() puts Liger's in its place

from .loss import IGNORE

FAST_DEVICES = ("cuda",)  # where the Triton kernels run


class FastRMSNorm(modeling_llama.LlamaRMSNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


class FastMLP(modeling_llama.LlamaMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerSiLUMulFunction

        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


class FusedLossHead(nn.Linear):
    def fused_lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of (tokens, hidden) states against labels (IGNORE skipped)."""
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)(self.weight, hidden, labels, self.bias)


def liger_pair_rope(q, k, cos, sin, *args, **kwargs):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) through Liger's kernel."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb(q, k, cos, sin)


def liger_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The layouts' one-tensor rope through Liger's kernel, which rotates a query and a key tensor
    together: the key here is one head of zeros."""
    rotated, _ = liger_pair_rope(x, x.new_zeros(x.shape[0], 1, *x.shape[2:]), cos, sin)
    return rotated


def close(fast: torch.Tensor, plain: torch.Tensor, tolerance: float) -> bool:
    """Finite, and within tolerance of plain relative to plain's norm."""
    fast, plain = fast.float(), plain.float()
    return bool(torch.isfinite(fast).all()) and float((fast - plain).norm()) <= tolerance * float(plain.norm()) + 1e-6


def agrees(fast_fn, plain_fn, inputs: list[torch.Tensor], tolerance: float) -> bool:
    """fast_fn's output and input gradients close to plain_fn's on the same inputs and output gradient."""
    results, out_grad = [], None
    for fn in (plain_fn, fast_fn):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = fn(*[leaf.clone() for leaf in leaves])  # clones: a kernel may write into its input
        out_grad = torch.randn_like(out) if out_grad is None else out_grad
        out.backward(out_grad)
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    (plain_out, plain_grads), (fast_out, fast_grads) = results
    return all(close(f, p, tolerance) for f, p in zip([fast_out, *fast_grads], [plain_out, *plain_grads]))


def checks(model, dtype: torch.dtype, device: torch.device) -> dict:
    """name -> a check that is True when that Liger kernel agrees with the plain path here, on inputs
    of the model's widths (the kernels are compiled for the shapes training will use)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    rand = functools.partial(torch.randn, device=device, dtype=dtype)
    tokens, hidden, eps = 64, config.hidden_size, config.rms_norm_eps
    angles = torch.rand(1, tokens, head_dim // 2, device=device) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    vocab = model.get_output_embeddings().weight.shape[0]
    labels = torch.randint(0, vocab, (2 * tokens,), device=device)
    labels[::7] = IGNORE

    def norm(cls):  # the forward of cls on a given weight: a namespace stands in for the module
        return lambda x, w: cls.forward(SimpleNamespace(weight=w, variance_epsilon=eps), x)

    def loss(fused: bool):
        def fn(h, w):
            if fused:
                return FusedLossHead.fused_lm_loss(SimpleNamespace(weight=w, bias=None), h, labels)
            return nn.functional.cross_entropy(nn.functional.linear(h, w).float(), labels, ignore_index=IGNORE)
        return fn

    def silu_mul(a, b):
        from liger_kernel.ops import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(a, b)

    def rope_input():  # (batch, heads, tokens, head_dim) laid out as a projection's output is
        return rand(2, tokens, config.num_attention_heads, head_dim).transpose(1, 2)

    width = config.intermediate_size
    return {
        "RMSNorm": lambda: agrees(norm(FastRMSNorm), norm(modeling_llama.LlamaRMSNorm),
                                  [rand(2, tokens, hidden), 1 + 0.1 * rand(hidden)], tolerance),
        "SwiGLU": lambda: agrees(silu_mul, lambda a, b: nn.functional.silu(a) * b,
                                 [rand(2, tokens, width), rand(2, tokens, width)], tolerance),
        "RoPE": lambda: agrees(lambda x: liger_rope(x, cos, sin), lambda x: PLAIN_ROPE(x, cos, sin), [rope_input()],
                               tolerance),
        "fused linear cross-entropy": lambda: agrees(loss(True), loss(False),
                                                     [rand(2 * tokens, hidden), 0.02 * rand(vocab, hidden)], tolerance),
    }


def working_kernels(model, dtype: torch.dtype, device: torch.device) -> tuple[list[str], list[str]]:
    """(the kernels that agree with the plain path here, 'name (why not)' for the others)."""
    working, left_out = [], []
    for name, check in checks(model, dtype, device).items():
        try:
            ok, why = check(), "disagrees with PyTorch"
        except Exception as err:  # a kernel that cannot run here, whatever it raises, is left out
            ok, why = False, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
        (working if ok else left_out).append(name if ok else f"{name} ({why})")
    return working, left_out


def rotary_modules(model) -> set:
    """The Python modules whose rotary function model's attention layers call."""
    return {sys.modules[type(m).__module__] for m in model.modules() if "Attention" in type(m).__name__}


def training_device() -> torch.device:
    """This rank's device, before DeepSpeed has made it the current one (every rank would otherwise
    check on GPU 0 and leave a CUDA context there)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def enable(model, kernels: str, zero_stage: int, loss: str, dtype: torch.dtype) -> str | None:
    """Put the Liger kernels that work here into model; returns the one line that says what runs
    (None on a CPU or with kernels: plain, where nothing changes)."""
    device = training_device()
    if kernels == "plain" or device.type not in FAST_DEVICES:
        return None
    try:
        import liger_kernel  # noqa: F401
    except ImportError as err:
        return f"fast path: liger-kernel cannot be imported ({err}); plain PyTorch kernels"
    working, left_out = working_kernels(model, dtype, device)
    if "fused linear cross-entropy" in working and (zero_stage == 3 or loss != "lm"):
        working.remove("fused linear cross-entropy")
        left_out.append("fused linear cross-entropy (ZeRO-3 partitions the output layer; kd: its teacher term)")
    faster = {modeling_llama.LlamaRMSNorm: ("RMSNorm", FastRMSNorm), modeling_llama.LlamaMLP: ("SwiGLU", FastMLP),
              nn.Linear: ("fused linear cross-entropy", FusedLossHead)}
    applied = set()
    for module in [m for m in model.modules() if type(m) is not nn.Linear] + [model.get_output_embeddings()]:
        name, fast = faster.get(type(module), (None, None))
        silu = getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")
        if name in working and (name != "SwiGLU" or silu):
            module.__class__ = fast
            applied.add(name)
    for module in rotary_modules(model) if "RoPE" in working else ():
        for name, fast in (("rope", liger_rope), ("apply_rotary_pos_emb", liger_pair_rope)):
            if hasattr(module, name):
                setattr(module, name, fast)
                applied.add("RoPE")
    line = f"fast path: Liger {', '.join(k for k in working if k in applied) or 'nothing'}"
    plain = left_out + [k for k in working if k not in applied]
    line += f"; plain PyTorch for {', '.join(plain)}" if plain else ""
    return line + ("; fused AdamW" if fused_adamw(str(device)) else "; AdamW unfused (no fused kernel here)")


@functools.cache
def fused_adamw(device: str) -> bool:
    """Whether torch's fused AdamW kernel runs on this device (tried once, on one tensor): it makes no
    per-tensor temporaries; where it is missing the default AdamW runs instead."""
    probe = torch.zeros(2, device=device, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, TypeError):
        return False
    return True
