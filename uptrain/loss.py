"""Next-token cross-entropy and distillation computed a chunk of tokens at a time.

`model(batch, labels=batch).loss` materializes the whole micro-batch's logits in fp32, autograd keeps
their log-softmax for the backward pass, and the backward pass makes a gradient of the same size: at
4 x 256 tokens and SmolLM2's 49,152-token vocabulary, 0.2 GB each, more than any other activation of
a 135M model. Here the model runs up to its final norm (through its own forward, so DeepSpeed's
engine still sees the outputs it hooks its backward pass on), and the output layer and the loss run
per chunk of tokens under activation checkpointing: a chunk's logits exist only while
that chunk is computed, again in the backward pass, never all at once. Same loss and gradients as
the plain path (tests/test_loss.py pins them to 1e-6), for one more output-layer matmul per chunk.
The recompute follows the recipe's activation_checkpointing: where memory is not short, a chunk keeps
its logits-sized activations for the backward pass instead, as the plain path does. On the parity
study's 1.6M-parameter MHA source (4,096-token vocabulary, 8,192 tokens a step, one CPU thread), where
the output layer and loss are a third of the step, the recompute costs a tenth to a fifth of the
step (bench/loss_recompute.py).

Measured on the demo's FusedKV uptraining (SmolLM2-135M, fp32, CPU): the first forward pass rose
0.78 GB, an eval 0.43 GB; chunked, 0.33 and 0.10 GB. The stage's steady peak, at the end of a
backward pass with every gradient allocated, comes after the logits are freed, so it moved only
2.73 -> 2.69 GB there; the logits and the gradients meet with gradient accumulation (the gradients
stay through the next micro-batch's forward pass) and at larger micro-batches or vocabularies.

On GPUs Liger-Kernel's fused linear cross-entropy does the same without the recompute; this
plain-torch version runs anywhere, ZeRO-3 included: the output layer is called as a module, so
DeepSpeed's hooks gather its partitioned weight for each chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of a position with no next token, as in transformers' ForCausalLMLoss
# 256 tokens at SmolLM2's 49,152-token vocabulary: 50 MB of fp32 logits per chunk. Larger chunks hold
# more; smaller ones make smaller matmuls and sum one more output-layer-sized gradient each. A small
# vocabulary gets longer chunks, up to 16 MiB of logits (1,024 tokens at 4,096): 256-token chunks
# (32 per 8,192-token batch, each recomputed) slowed the 1.3M-parameter parity sources, and chunks
# over glibc's 32 MiB ceiling for heap blocks are mapped and page-faulted afresh each time (3,072
# tokens: a quarter of the step in the kernel).
CHUNK_TOKENS = 256
CHUNK_LOGITS = 1 << 22


def hidden_states(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every layer's hidden states, (batch, seq, hidden) each, through model's own forward: the
    embeddings', each decoder layer's output, the last one after the final norm.

    `model` is what training calls (a DeepSpeed engine or the bare model). The output layer runs on
    the last position only (logits_to_keep=1); transformers returns the normed last hidden state as
    the last of `hidden_states`."""
    return model(input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states


def final_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The last hidden states after the final norm, (batch, seq, hidden)."""
    return hidden_states(model, input_ids)[-1]


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The mean over decoder layers of the student's squared distance to the teacher's output, relative
    to the teacher's squared norm (0: the same states; 1: as far off as zeros would be). The
    embeddings' states (index 0) are left out: a conversion never changes them."""
    losses = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp(min=1e-12)
              for s, t in zip(student[1:], teacher[1:], strict=True)]
    return torch.stack(losses).mean()


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Each position's target: the next token; the last position has none (IGNORE)."""
    return F.pad(input_ids[:, 1:], (0, 1), value=IGNORE)


def _chunk_losses(head, hidden, labels, teacher_head, teacher_hidden, temperature: float):
    """Cross-entropy summed over the chunk's labelled tokens and, with a teacher, KL(teacher || student)
    at the temperature summed over all its tokens (0 without one)."""
    logits = head(hidden).float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    if teacher_head is None:
        return ce, ce.new_zeros(())
    with torch.no_grad():
        teacher = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)
    student = F.log_softmax(logits / temperature, dim=-1)
    return ce, F.kl_div(student, teacher, log_target=True, reduction="sum")


@dataclass
class Teacher:
    """Distillation's side of chunked_losses: the teacher's hidden states for the same batch (the final
    ones, which the chunks read; every layer's when hidden_state_loss needs them), its output layer,
    and the temperature."""

    layers: tuple[torch.Tensor, ...]
    head: torch.nn.Module
    temperature: float = 1.0

    @property
    def hidden(self) -> torch.Tensor:
        """The final hidden states, after the final norm."""
        return self.layers[-1]

    @classmethod
    @torch.no_grad()
    def on(cls, model, input_ids: torch.Tensor, temperature: float, every_layer: bool = False) -> Teacher:
        """every_layer keeps each layer's states for hidden_state_loss; without it only the final ones
        are held for the step (the others are (layers x batch x seq x hidden) of memory)."""
        states = hidden_states(model, input_ids)
        return cls(states if every_layer else states[-1:], model.get_output_embeddings(), temperature)


def chunked_losses(hidden: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor, teacher: Teacher | None = None,
                   chunk_tokens: int | None = None, recompute: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lm, kd) from final hidden states without the whole batch's logits.

    lm: mean next-token cross-entropy, as `model(input_ids, labels=input_ids).loss`.
    kd (None without a teacher): KL(teacher || student) of the temperature-softened distributions,
    scaled by T^2 (Hinton et al.), per token; tests/test_loss.py holds the same on whole logits.
    recompute: checkpoint each chunk (its logits again in the backward pass) rather than keep them."""
    width = hidden.shape[-1]
    chunk_tokens = chunk_tokens or max(CHUNK_TOKENS, CHUNK_LOGITS // head.out_features)
    labels = next_token_labels(input_ids).reshape(-1)
    hidden = hidden.reshape(-1, width)
    fused = getattr(head, "fused_lm_loss", None)  # the GPU fast path's output layer (uptrain/fast_path.py)
    if fused is not None and teacher is None and torch.is_grad_enabled() and hidden.requires_grad:
        return fused(hidden, labels), None
    teacher_chunks = teacher.hidden.reshape(-1, teacher.hidden.shape[-1]).split(chunk_tokens) if teacher is not None \
        else [None] * len(labels.split(chunk_tokens))
    teacher_head, temperature = (teacher.head, teacher.temperature) if teacher is not None else (None, 1.0)
    recompute = recompute and torch.is_grad_enabled() and hidden.requires_grad
    ce_sum, kl_sum = 0.0, 0.0
    for h, y, t in zip(hidden.split(chunk_tokens), labels.split(chunk_tokens), teacher_chunks):
        args = (head, h, y, teacher_head, t, temperature)
        ce, kl = checkpoint(_chunk_losses, *args, use_reentrant=False) if recompute else _chunk_losses(*args)
        ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
    lm = ce_sum / (labels != IGNORE).sum().clamp(min=1)
    kd = kl_sum * temperature ** 2 / labels.numel() if teacher is not None else None
    return lm, kd
