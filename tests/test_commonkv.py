"""CommonKV: exact at full rank, a cache of latents only, generate == full forward, adaptive budget, convert CLI."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from convert.commonkv import adaptive_ranks, group_factors, group_similarity
from convert.layerwise import LayerwiseModel
from models import SharedKVForCausalLM
from models.source_layout import shared_kv_config
from validate.kvcache import kv_cache_bytes
from tests.test_models import VOCAB, incremental_logits, random_source

IDS = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(0))


def commonkv_model(source, **layout_kwargs):
    """The source converted in memory: the paper's SVD factors, every other weight as it is."""
    cfg = shared_kv_config(source.config, "commonkv", **layout_kwargs)
    model = SharedKVForCausalLM(cfg).eval()
    state = source.state_dict()
    for group in range(len(cfg.commonkv_groups)):
        state.update(group_factors(state.__getitem__, cfg, group))
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys
    return model


def norms_away_from_one(source):
    """Input-norm weights that differ per layer and channel, so folding them into the factors matters."""
    with torch.no_grad():
        for layer in source.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return source


# MHA, GQA, qkv bias, k_norm on the rebuilt keys, RoPE scaled past the original context at attention time
@pytest.mark.parametrize("family,kv_heads", [("llama", 4), ("llama", 2), ("qwen2", 2), ("qwen3", 2), ("llama3", 2)])
def test_full_rank_equals_source_logits(family, kv_heads):
    source = norms_away_from_one(random_source(family, kv_heads=kv_heads))
    model = commonkv_model(source, commonkv_ratio=1.0)
    assert model.config.commonkv_group_size == 1
    torch.testing.assert_close(model(IDS).logits, source(IDS).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ratio,group_size", [(0.25, 4), (0.3, 3), (0.5, 2), (0.75, 1), (1.0, 1)])
def test_measured_cache_bytes_equal_arithmetic(ratio, group_size):
    source = random_source(layers=6, kv_heads=1)  # caps (hidden 64) never bind: ranks add up to the ratio
    model = commonkv_model(source, commonkv_ratio=ratio)
    cfg = model.config
    assert cfg.commonkv_group_size == group_size and cfg.kv_sharing_modes.count(None) == len(cfg.commonkv_groups)
    batch, tokens = 3, 11
    _, cache = incremental_logits(model, torch.randint(0, VOCAB, (batch, tokens)), prefix=5)
    per_token = cfg.kv_cache_bytes_per_token(4)
    assert kv_cache_bytes(cache) == per_token * batch * tokens
    source_per_token = 2 * 6 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert per_token == round(ratio * source_per_token / 4) * 4
    assert all(layer.values is None or layer.values.numel() == 0 for layer in cache.layers)  # latents only


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_new_sources_decode_incrementally_and_cache_what_the_arithmetic_says(family):
    model = commonkv_model(random_source(family, kv_heads=2), commonkv_ratio=0.5)
    with torch.no_grad():
        inc, cache = incremental_logits(model, IDS, prefix=8)
        torch.testing.assert_close(inc, model(IDS).logits, atol=1e-5, rtol=0)
    assert kv_cache_bytes(cache) == model.config.kv_cache_bytes_per_token(4) * IDS.numel()


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_incremental_decoding_and_generate_equal_full_forward(ratio):
    model = commonkv_model(random_source(layers=5, kv_heads=2), commonkv_ratio=ratio)
    full = model(IDS).logits
    inc, _ = incremental_logits(model, IDS, prefix=6)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)

    prompt = IDS[:1, :6]
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    greedy = prompt
    for _ in range(6):  # the same tokens from full forwards without a cache
        greedy = torch.cat([greedy, model(greedy).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, greedy)


def test_left_padded_batch_generates_like_single_sequences():
    model = commonkv_model(random_source(kv_heads=2), commonkv_ratio=0.5)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (7, 4)]
    ids, mask = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 7 - len(p):], mask[row, 7 - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, p in enumerate(prompts):
        single = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=5,
                                do_sample=False, pad_token_id=0)
        assert torch.equal(batched[row, 7:], single[0, len(p):])


def test_gradients_reach_the_factors():
    model = commonkv_model(random_source(kv_heads=2), commonkv_ratio=0.5).train()
    model(IDS, labels=IDS).loss.backward()
    factors = {n: p.grad for n, p in model.named_parameters() if ".kv_down." in n or ".kv_up." in n}
    assert len(factors) == 2 + 4 and all(g is not None and g.abs().sum() > 0 for g in factors.values())


def test_adaptive_budget_gives_more_rank_to_the_less_similar_group():
    source = random_source(kv_heads=1)  # budget 64 of caps 2 x 64: room to move rank between the groups
    with torch.no_grad():  # layer 0 adds nothing to the residual stream: group 0's layers see the same input
        source.model.layers[0].self_attn.o_proj.weight.zero_()
        source.model.layers[0].mlp.down_proj.weight.zero_()
        source.model.layers[2].mlp.down_proj.weight.normal_(0, 5.0)  # ... and layer 2 changes it a lot
    cfg = shared_kv_config(source.config, "commonkv", commonkv_ratio=0.5)
    state = source.state_dict()
    similarity = group_similarity(LayerwiseModel.build(lambda: type(source)(source.config), state.__getitem__, "cpu"), cfg, IDS)
    assert similarity[0] == pytest.approx(1.0, abs=1e-5) and similarity[1] < 0.9
    ranks = adaptive_ranks(cfg, similarity)
    assert ranks[1] > ranks[0] and sum(ranks) == sum(cfg.commonkv_ranks) == cfg.commonkv_budget
    assert cfg.commonkv_ranks[0] == cfg.commonkv_ranks[1]  # uniform without calibration


# --- run.py convert ------------------------------------------------------------------------------

def test_convert_cli_end_to_end(make_source, cli, tmp_path):
    src = make_source(family="qwen2", tied=False)
    out = tmp_path / "ckv"
    assert cli("convert", "--source", src, "--layout", "commonkv", "--commonkv-ratio", "0.5", "--calib-tokens", 128,
               "--out", out) == 0
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.kv_layout == "commonkv" and (out / "modeling_sharedkv.py").is_file()
    manifest = json.loads((out / "conversion.json").read_text())
    kv = manifest["kv_cache_bytes_per_token"]
    assert kv["converted"] * 2 == kv["source"]
    assert {m["rule"] for m in manifest["mappings"]} == {"copy", "svd"}
    assert [row["rank"] for row in manifest["fit"]] == model.config.commonkv_ranks
    svd_sources = {key for m in manifest["mappings"] if m["rule"] == "svd" for key in m["sources"]}
    assert {"model.layers.1.self_attn.k_proj.bias", "model.layers.1.input_layernorm.weight"} <= svd_sources
    ids = torch.randint(0, 49152, (1, 10))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("family", ["llama", "qwen3", "llama3"])  # llama3: 16 positions, past the original 8
def test_convert_cli_ratio_one_is_exact(make_source, cli, tmp_path, family):
    src = make_source(family=family, kv_heads=2)
    out = tmp_path / "full"
    assert cli("convert", "--source", src, "--layout", "commonkv", "--commonkv-ratio", "1", "--commonkv-rank-split", "uniform",
               "--out", out) == 0
    ids = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()(ids).logits
        original = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
    torch.testing.assert_close(converted, original, atol=1e-4, rtol=0)


def test_reconstruct_fits_the_factors_and_moves_the_outputs_back_to_the_source(make_source, cli, tmp_path):
    src = make_source(layers=4, kv_heads=2)
    common = ["--source", src, "--layout", "commonkv", "--commonkv-ratio", "0.5", "--calib-tokens", 256]
    assert cli("convert", *common, "--out", tmp_path / "svd") == 0
    assert cli("convert", *common, "--init", "reconstruct", "--reconstruct-steps", 40, "--out", tmp_path / "fit") == 0
    manifest = json.loads((tmp_path / "fit" / "conversion.json").read_text())
    # CommonKV's own defaults: an lr that keeps the SVD factors near their start, layers fitted independently
    assert (manifest["options"]["reconstruct_lr"], manifest["options"]["reconstruct_mode"]) == (1e-3, "independent")
    layers = [row for row in manifest["fit"] if "layer" in row]
    assert [row["layer"] for row in layers] == [0, 1, 2, 3] and all(r["error_after"] <= r["error_before"] for r in layers)
    assert layers[1]["error_after"] < 0.5 * layers[1]["error_before"]  # the layer reading its anchor's latent
    rules = {m["target"]: m["rule"] for m in manifest["mappings"]}
    assert rules["model.layers.0.self_attn.kv_down.weight"] == rules["model.layers.1.self_attn.kv_up.weight"] == "fitted"
    from common.sources import default_wikitext, load_tokenizer
    ids = torch.tensor(load_tokenizer(src)(default_wikitext("valid").read_text()[:20000])["input_ids"][:256])[None]
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits
        distance = {name: (AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True).eval()(ids).logits
                           - reference).pow(2).mean().item() for name in ("svd", "fit")}
    assert distance["fit"] < 0.5 * distance["svd"]


def test_reconstruct_defaults_follow_the_layout_and_give_way_to_flags():
    from convert import ConvertOptions

    def resolved(**opts):
        return ConvertOptions(**opts).reconstruct_settings()

    assert resolved(layout="commonkv") == (1e-3, "independent")
    assert resolved(layout="skipv1") == resolved(layout="fusedkv") == (1e-2, "sequential")
    assert resolved(layout="commonkv", reconstruct_lr=0.05, reconstruct_mode="sequential") == (0.05, "sequential")


@pytest.mark.parametrize("argv", [("--commonkv-ratio", "0"), ("--commonkv-ratio", "1.5"), ("--commonkv-ratio", "-0.2"), ("--commonkv-ratio", "half"),
                                  ("--init", "calibrated")])
def test_bad_commonkv_options_exit_2_and_write_nothing(make_source, cli, tmp_path, argv):
    src = make_source()
    out = tmp_path / "bad"
    assert cli("convert", "--source", src, "--layout", "commonkv", *argv, "--out", out) == 2
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


# --- uptrain and validate treat it like any other layout ----------------------------------------

def test_uptrain_then_validate_a_commonkv_checkpoint(make_source, cli, tmp_path):
    import yaml

    from common.sources import default_wikitext
    from tests.test_validate import report, validate_args

    src = make_source(layers=5)
    converted = tmp_path / "ckv"
    assert cli("convert", "--source", src, "--layout", "commonkv", "--commonkv-ratio", "0.5", "--calib-tokens", 128,
               "--out", converted) == 0
    text = tmp_path / "train.txt"
    text.write_text(default_wikitext("valid").read_text()[:20000])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(converted), "data": str(text), "out": str(tmp_path / "run"),
                                      "seq_len": 32, "micro_batch": 2, "budget": {"steps": 4}, "lr": 3e-3,
                                      "warmup_steps": 1, "eval_every": 4, "save_every": 4, "eval_tokens": 64}))
    assert cli("uptrain", "--config", recipe) == 0
    final = tmp_path / "run" / "final"
    trained = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True).state_dict()
    start = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True).state_dict()
    assert not torch.equal(trained["model.layers.0.self_attn.kv_down.weight"],
                           start["model.layers.0.self_attn.kv_down.weight"])  # the shared factor trained
    out = tmp_path / "report"
    assert cli(*validate_args(src, final, text, out)) in (0, 1)
    candidate = report(out)["models"]["candidate"]
    assert candidate["kv_bytes_per_token_measured"] == candidate["kv_bytes_per_token_arithmetic"]
    assert candidate["kv_saving_vs_source"] >= 0.5
