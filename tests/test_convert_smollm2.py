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
