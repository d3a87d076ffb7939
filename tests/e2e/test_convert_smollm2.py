"""The real model: SmolLM2-135M (the shipped GGUF) converted to FusedKV with each initialization."""
import math

import pytest
import torch

import run
from common.sources import default_wikitext, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def heldout_ids():
    text = default_wikitext("test").read_text()[:20000]
    return torch.tensor(load_tokenizer(None)(text)["input_ids"][:1024]).view(2, 512)


@pytest.fixture(scope="module")
def step0_ppl(tmp_path_factory, heldout_ids):
    """Held-out perplexity of the source and of its copy- and calibrated-init FusedKV conversions."""
    folder = tmp_path_factory.mktemp("smollm2")
    ppl = {"source": perplexity(None, heldout_ids)}
    for init in ("copy", "calibrated"):
        assert run.main(["convert", "--layout", "fusedkv", "--init", init, "--calib-tokens", "2048",
                         "--out", str(folder / init)]) == 0
        ppl[init] = perplexity(folder / init, heldout_ids)
    print(f"\nstep-0 perplexity on 1024 WikiText-2 test tokens: {ppl}")
    return ppl


def perplexity(path, ids) -> float:
    model = load_causal_lm(path)
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_step0_perplexity_calibrated_beats_copy(step0_ppl):
    # A correct conversion of a pretrained model is far from the source at step 0 ...
    assert step0_ppl["copy"] > 100 * step0_ppl["source"]
    # ... and the closed-form gate fit recovers part of the gap without any training.
    assert step0_ppl["calibrated"] < step0_ppl["copy"]


def test_step0_perplexity_reconstruct_beats_calibrated(step0_ppl, tmp_path, heldout_ids):
    out = tmp_path / "reconstruct"
    assert run.main(["convert", "--layout", "fusedkv", "--init", "reconstruct", "--reconstruct-steps", "4",
                     "--calib-tokens", "512", "--out", str(out)]) == 0
    ppl = perplexity(out, heldout_ids)
    print(f"\nstep-0 perplexity, reconstruct (4 steps, 512 tokens): {ppl:.1f}")
    assert ppl < step0_ppl["calibrated"]


def test_the_embedded_gguf_loads_through_its_dequantized_cache(tmp_path, monkeypatch):
    """A small GGUF is dequantized once into the user cache (the first load anywhere in the suite
    made it), and every later load reads that folder: the same weights as the GGUF's own
    dequantization, the same tokenizer."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    from common import sources

    gguf = sources.default_model_path()
    folder = sources.dequantized(gguf)
    assert folder.parent == sources.cache_root() / "gguf" and (folder / "config.json").is_file()
    embedding = next(t for t in GGUFReader(gguf).tensors if t.name == "token_embd.weight")
    with safe_open(folder / "model.safetensors", "np") as saved:
        cached = saved.get_tensor("model.embed_tokens.weight")
    assert np.array_equal(cached, dequantize(embedding.data, embedding.tensor_type).reshape(cached.shape))

    def dequantizing(path):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(sources, "_load_gguf_model", dequantizing)
    text = default_wikitext("test").read_text()[:4000]
    assert load_tokenizer(None)(text)["input_ids"] == sources._load_gguf_tokenizer(gguf)(text)["input_ids"]
    assert load_causal_lm(None).config.num_hidden_layers == 30
    # a cache that cannot be written: the GGUF is read directly, nothing fails
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("KVSHARE_CACHE", str(tmp_path / "not-a-folder"))
    assert sources.dequantized(gguf) is None
