"""uptrain.loss: the chunked loss equals the plain whole-logits path, and never keeps the whole logits."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from models import SharedKVConfig, SharedKVForCausalLM
from uptrain.loss import Teacher, chunked_losses, final_hidden_states, hidden_state_loss, hidden_states

VOCAB = 97


def distill_loss(student_logits, teacher_logits, temperature):
    """KL(teacher || student) on whole logits, T^2-scaled, per token: the definition the chunks must match."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t / student_logits.shape[1]


def tiny(layout: str | None = None, seed: int = 0, tied: bool = True):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    if layout is None:
        return LlamaForCausalLM(LlamaConfig(**fields)).double()
    return SharedKVForCausalLM(SharedKVConfig(**fields, kv_layout=layout)).double()


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_gradients(got: dict, expected: dict) -> None:
    """Equal to 1e-6 of each gradient's largest entry (both paths take the loss in fp32, in another order)."""
    for name, g in got.items():
        scale = expected[name].abs().max().item()
        assert (g - expected[name]).abs().max().item() <= 1e-6 * scale, name


class Engine(torch.nn.Module):  # what DeepSpeed's engine is to batch_loss: callable, the model as .module
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def logits_kept(model, loss_of) -> int:
    """Positions of vocabulary-wide activations (not weights) saved for backward while loss_of() runs."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = []

    def pack(t):
        if t.dim() and t.shape[-1] == VOCAB and t.untyped_storage().data_ptr() not in weights:
            kept.append(t.numel() // VOCAB)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of()
    return sum(kept)


def chunked(model, ids, chunk_tokens, teacher=None, temperature=2.0):
    distill = Teacher.on(teacher, ids, temperature) if teacher is not None else None
    return chunked_losses(final_hidden_states(model, ids), model.get_output_embeddings(), ids, distill, chunk_tokens)


@pytest.mark.parametrize("layout", [None, "fusedkv"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_tokens", [5, 16, 1000])  # uneven last chunk, even chunks, one chunk
def test_chunked_lm_loss_and_gradients_equal_the_plain_loss(layout, tied, chunk_tokens):
    model = tiny(layout, tied=tied)
    ids = torch.randint(0, VOCAB, (3, 16))
    plain = model(ids, labels=ids, use_cache=False).loss
    plain.backward()
    expected = grads(model)
    lm, kd = chunked(model, ids, chunk_tokens)
    lm.backward()
    assert kd is None
    assert lm.item() == pytest.approx(plain.item(), rel=1e-6)
    assert_same_gradients(grads(model), expected)


def test_chunked_kd_loss_and_gradients_equal_distill_loss_on_whole_logits():
    model, teacher = tiny("fusedkv"), tiny(None, seed=1)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        teacher_logits = teacher(ids, use_cache=False).logits
    out = model(ids, labels=ids, use_cache=False)
    plain_kd = distill_loss(out.logits, teacher_logits, 2.0)
    (0.3 * out.loss + 0.7 * plain_kd).backward()
    expected = grads(model)
    lm, kd = chunked(model, ids, 7, teacher)
    (0.3 * lm + 0.7 * kd).backward()
    assert kd.item() == pytest.approx(plain_kd.item(), rel=1e-6)
    assert lm.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert_same_gradients(grads(model), expected)


def test_no_whole_batch_logits_are_kept_for_backward():
    """Autograd saves no logits outside the checkpointed chunks (which keep only their inputs)."""
    model = tiny("fusedkv")
    ids = torch.randint(0, VOCAB, (4, 32))
    assert logits_kept(model, lambda: chunked(model, ids, 16)) == 0
    assert logits_kept(model, lambda: model(ids, labels=ids, use_cache=False).loss) >= ids.numel()  # the hook sees them


def test_kd_is_zero_against_itself_and_positive_against_another_model():
    model = tiny("fusedkv")
    ids = torch.randint(0, VOCAB, (2, 12))
    _, itself = chunked(model, ids, 5, model)
    _, other = chunked(model, ids, 5, tiny(None, seed=1))
    assert abs(itself.item()) < 1e-6 and other.item() > 0


def test_eval_without_grad_gives_the_same_loss():
    model = tiny("fusedkv")
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        plain = model(ids, labels=ids, use_cache=False).loss
        lm, _ = chunked(model, ids, 3)
    assert not lm.requires_grad
    assert lm.item() == pytest.approx(plain.item(), rel=1e-6)


def test_lm_plus_kd_moves_its_weight_from_kd_weight_to_kd_weight_end():
    from uptrain.recipe import Recipe
    from uptrain.train import batch_loss

    model, teacher = tiny("fusedkv"), tiny(None, seed=1)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        lm, kd = chunked_losses(final_hidden_states(model, ids), model.get_output_embeddings(), ids,
                                Teacher.on(teacher, ids, 2.0))
        fading = Recipe(loss="lm+kd", kd_weight=0.6, kd_weight_end=0.0)
        steady = Recipe(loss="lm+kd", kd_weight=0.6)
        for recipe, progress, weight in ((fading, 0.0, 0.6), (fading, 0.5, 0.3), (fading, 1.0, 0.0), (steady, 1.0, 0.6)):
            got = batch_loss(Engine(model), ids, recipe, teacher, progress)
            assert got.item() == pytest.approx(((1 - weight) * lm + weight * kd).item(), rel=1e-6)


def test_hidden_state_loss_is_each_layers_relative_squared_distance_averaged():
    """0 against itself; a student whose decoder states were all zeros scores 1; otherwise the mean
    over decoder layers (not the embeddings') of |s - t|^2 / |t|^2, computed here by hand."""
    student, teacher = tiny("fusedkv"), tiny(None, seed=1)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        s, t = hidden_states(student, ids), hidden_states(teacher, ids)
        assert len(s) == len(t) == 5  # the embeddings' and each of the 4 decoder layers' outputs
        assert hidden_state_loss(t, t).item() == 0
        assert hidden_state_loss((t[0], *(torch.zeros_like(x) for x in t[1:])), t).item() == pytest.approx(1.0)
        by_hand = sum(((a - b) ** 2).sum() / (b ** 2).sum() for a, b in zip(s[1:], t[1:])) / 4
        assert hidden_state_loss(s, t).item() == pytest.approx(by_hand.item(), rel=1e-6)  # taken in fp32


def test_kd_hidden_weight_adds_the_hidden_state_loss_and_needs_a_teacher():
    from common.errors import UserError
    from uptrain.recipe import Recipe, load_recipe
    from uptrain.train import batch_loss

    model, teacher = tiny("fusedkv"), tiny(None, seed=1)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        plain = batch_loss(Engine(model), ids, Recipe(loss="lm+kd"), teacher)
        with_states = batch_loss(Engine(model), ids, Recipe(loss="lm+kd", kd_hidden_weight=0.3), teacher)
        distance = hidden_state_loss(hidden_states(model, ids), hidden_states(teacher, ids))
    assert distance.item() > 0.01
    assert with_states.item() == pytest.approx(plain.item() + 0.3 * distance.item(), rel=1e-6)
    with pytest.raises(UserError, match="set loss to kd or lm\\+kd"):
        load_recipe(None, ["kd_hidden_weight=1"])


@pytest.mark.parametrize("checkpointing", [True, False])
def test_batch_loss_recomputes_the_output_layer_only_under_activation_checkpointing(checkpointing):
    """The recipe's activation_checkpointing decides whether the chunks' logits are kept for backward;
    either way the loss and the gradients are the plain path's."""
    from uptrain.recipe import Recipe
    from uptrain.train import batch_loss

    model = tiny("fusedkv")
    ids = torch.randint(0, VOCAB, (4, 32))
    model(ids, labels=ids, use_cache=False).loss.backward()
    expected = grads(model)
    losses = []
    kept = logits_kept(model, lambda: losses.append(
        batch_loss(Engine(model), ids, Recipe(loss="lm", activation_checkpointing=checkpointing), None)))
    losses[0].backward()
    assert_same_gradients(grads(model), expected)
    assert (kept == 0) == checkpointing
