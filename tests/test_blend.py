"""Progressive conversion (blend_steps): the source at t = 0, the layout at t = 1, nothing of the
blend in the export."""
import json

import pytest
import torch
from safetensors import safe_open

from common.sources import load_causal_lm
from uptrain import blend
from uptrain.engine import optimizer_and_schedule
from tests.test_models import incremental_logits
from uptrain.recipe import load_recipe


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1", "commonkv"])
def test_blend_starts_at_the_source_and_ends_at_the_layout(layout, make_source, cli, tmp_path):
    source = make_source(kv_heads=2)
    out = tmp_path / layout
    assert cli("convert", "--source", source, "--layout", layout, "--out", out) == 0
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    source_logits = logits(load_causal_lm(source), ids)
    model = load_causal_lm(out)
    layout_logits = logits(model, ids)
    assert not torch.allclose(layout_logits, source_logits, atol=1e-3)  # the conversion changed the model

    for shape in ("linear", "layerwise"):
        schedule = blend.BlendSchedule(steps=4, shape=shape)
        assert blend.attach(model, source, schedule) == len(blend.converted_layers(model)) > 0
        assert schedule.layers == tuple(attn.layer_idx for attn in blend.converted_layers(model))
        torch.testing.assert_close(logits(model, ids), source_logits, atol=2e-5, rtol=1e-5)
        schedule.step = 2  # linear: every layer halfway; layerwise: the top half converted, the rest not
        halfway = logits(model, ids)
        assert not torch.allclose(halfway, source_logits, atol=1e-3)
        assert not torch.allclose(halfway, layout_logits, atol=1e-3)
        with torch.no_grad():  # the blend through the model's K/V hook stays right on a cache
            torch.testing.assert_close(incremental_logits(model, ids, prefix=10)[0], halfway, atol=1e-5, rtol=0)
            other = model(ids[:, :5], use_cache=True).past_key_values  # a prefill of another length
            model(ids[:, :7], use_cache=True)
            with pytest.raises(RuntimeError, match="cache its prefill started"):
                model(ids[:, 5:6], past_key_values=other, use_cache=True)
        schedule.step = 4
        torch.testing.assert_close(logits(model, ids), layout_logits)
        blend.detach(model)
    assert not any("kv_substitute" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), layout_logits)


def test_schedules_rise_from_zero_to_one():
    linear, cosine = blend.BlendSchedule(10), blend.BlendSchedule(10, "cosine")
    ts = []
    for step in (0, 5, 10, 12):
        linear.step = cosine.step = step
        ts.append((linear.t, cosine.t))
    assert ts == [(0.0, 0.0), (0.5, pytest.approx(0.5)), (1.0, 1.0), (1.0, 1.0)]


def test_layerwise_converts_the_top_layer_first_then_each_below_it():
    schedule = blend.BlendSchedule(8, "layerwise", layers=(4, 5, 6, 7))
    shares = {}
    for step in (0, 1, 2, 3, 6, 8, 9):
        schedule.step = step
        shares[step] = [schedule.share(layer) for layer in (4, 5, 6, 7)]
    assert shares == {0: [0, 0, 0, 0], 1: [0, 0, 0, 0.5], 2: [0, 0, 0, 1], 3: [0, 0, 0.5, 1],
                      6: [0, 1, 1, 1], 8: [1, 1, 1, 1], 9: [1, 1, 1, 1]}


def test_switch_gives_each_layer_all_or_nothing_drawn_reproducibly(make_source, cli, tmp_path):
    """switch: each converted layer is wholly the source's or the layout's at a step, with
    probability t of the layout's, and the same draw for the same (seed, step, layer)."""
    schedule = blend.BlendSchedule(100, "switch", seed=3)
    draws = {}
    for step in range(0, 100, 2):
        schedule.step = step
        draws[step] = [schedule.share(layer) for layer in range(20)]
        assert draws[step] == [schedule.share(layer) for layer in range(20)]  # a recompute draws the same
    assert {x for row in draws.values() for x in row} == {0.0, 1.0}
    early = sum(sum(draws[s]) for s in range(0, 50, 2)) / (25 * 20)
    late = sum(sum(draws[s]) for s in range(50, 100, 2)) / (25 * 20)
    assert 0.15 < early < 0.35 and 0.65 < late < 0.85  # E[t] is 0.24 and 0.74
    schedule.step = 100
    assert [schedule.share(layer) for layer in range(20)] == [1.0] * 20
    other = blend.BlendSchedule(100, "switch", seed=4, step=50)
    schedule.step = 50
    assert [other.share(layer) for layer in range(20)] != [schedule.share(layer) for layer in range(20)]

    # in the model: each layer's K/V is exactly one side's, whatever the draws
    source = make_source(kv_heads=2)
    out = tmp_path / "converted"
    assert cli("convert", "--source", source, "--layout", "fusedkv", "--out", out) == 0
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    source_logits = logits(load_causal_lm(source), ids)
    model = load_causal_lm(out)
    layout_logits = logits(model, ids)
    layers = [attn.layer_idx for attn in blend.converted_layers(model)]
    switch = blend.BlendSchedule(4, "switch", step=2)
    blend.attach(model, source, switch)
    seen = set()
    for seed in range(64):  # t = 0.5: seeds whose draws give all-source, all-layout and mixed layers
        switch.seed = seed
        drawn = frozenset(switch.share(layer) for layer in layers)
        seen.add(drawn)
        with_layers = logits(model, ids)
        if drawn == {0.0}:
            torch.testing.assert_close(with_layers, source_logits, atol=2e-5, rtol=1e-5)
        elif drawn == {1.0}:
            torch.testing.assert_close(with_layers, layout_logits)
        else:
            assert not torch.allclose(with_layers, source_logits, atol=1e-3)
            assert not torch.allclose(with_layers, layout_logits, atol=1e-3)
    assert len(seen) == 3


def test_source_projections_are_frozen_and_not_optimized(converted, make_source):
    model = load_causal_lm(converted).train()
    blend.attach(model, make_source(), blend.BlendSchedule(2))
    frozen = {id(p) for name, p in model.named_parameters() if "kv_substitute" in name}
    assert frozen and all(not p.requires_grad for name, p in model.named_parameters() if "kv_substitute" in name)
    optimizer, _ = optimizer_and_schedule(model, load_recipe(None), total_steps=4)
    assert not frozen & {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_uptrain_with_a_blend_exports_only_the_layout(recipe, cli, converted, tmp_path):
    """final/ and an export_at step's export past the ramp (the source projections still attached) alike."""
    assert cli("uptrain", "--config", recipe(blend_steps=3, export_at=[4])) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("blend_t") for r in records if "loss" in r] == [0.0, pytest.approx(1 / 3, abs=1e-4), pytest.approx(2 / 3, abs=1e-4), None, None, None]
    for export in ("final", "exports/step4"):
        with safe_open(tmp_path / "run" / export / "model.safetensors", "pt") as exported, \
                safe_open(converted / "model.safetensors", "pt") as conversion:
            assert set(exported.keys()) == set(conversion.keys()), export


def test_a_blend_longer_than_the_run_is_refused(recipe, cli, capsys):
    assert cli("uptrain", "--config", recipe(blend_steps=7)) == 2
    assert "blend_steps 7 is more than the run's 6 steps" in capsys.readouterr().err
