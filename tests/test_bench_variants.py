"""bench/variants.py: benchmark variants change the one model they are given, and compute the same logits."""
import pytest
import torch

from bench import variants
from bench.variants import CompiledFusion, FuseFirst, split_variants, with_variants
from models.modeling_sharedkv import FusedAttention
from tests.test_models import VOCAB, incremental_logits, layout_model


def test_suffixes_name_the_variants():
    assert split_variants("fusedkv") == ("fusedkv", [])
    assert split_variants("fusedkv_fuse_first") == ("fusedkv", [FuseFirst])
    assert split_variants("fusedkv_compiled_fuse_first") == ("fusedkv", [CompiledFusion, FuseFirst])
    assert split_variants("sharing_off") == ("sharing_off", [])


def test_variants_change_only_their_model_and_decode_the_same(monkeypatch):
    fused = []  # what went through the (stand-in) compiled fusion
    monkeypatch.setattr(variants, "compiled_fuse", lambda: lambda *t: fused.append(1) or FusedAttention.fuse(*t))
    steps = []
    original = FusedAttention.decode_step
    monkeypatch.setattr(FusedAttention, "decode_step", lambda self, *a: steps.append(1) or original(self, *a))
    variant = with_variants(layout_model("fusedkv"), [CompiledFusion, FuseFirst])
    plain = layout_model("fusedkv")  # built after the variant: as if there were none
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        reference, _ = incremental_logits(plain, ids, prefix=5)
        assert steps and not fused  # the plain model decodes by decode_step
        steps.clear()
        logits, _ = incremental_logits(variant, ids, prefix=5)
    assert fused and not steps  # the variant fuses first, through the compiled fusion
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert all(m.kv_substitute is None for m in plain.modules() if isinstance(m, FusedAttention))


def test_fuse_first_decodes_through_the_fused_kv_without_compiling(monkeypatch):
    monkeypatch.setattr(variants, "compiled_fuse", lambda: pytest.fail("fuse_first alone compiles nothing"))
    steps = []
    original = FusedAttention.decode_step
    monkeypatch.setattr(FusedAttention, "decode_step", lambda self, *a: steps.append(1) or original(self, *a))
    plain = layout_model("fusedkv")
    variant = with_variants(layout_model("fusedkv"), [FuseFirst])
    variant.load_state_dict(plain.state_dict())  # the substitute adds no state
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        logits, _ = incremental_logits(variant, ids, prefix=5)
        assert not steps
        torch.testing.assert_close(logits, plain(ids).logits, atol=1e-5, rtol=0)
