"""The real model: SmolLM2-135M (the shipped GGUF) converted to FusedKV with each initialization."""
import math

import pytest
import torch

from common.sources import default_wikitext, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def heldout_ids():
    text = default_wikitext("test").read_text()[:20000]
    return torch.tensor(load_tokenizer(None)(text)["input_ids"][:1024]).view(2, 512)


def perplexity(path, ids) -> float:
    model = load_causal_lm(path)
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_step0_perplexity_copy_vs_calibrated_vs_reconstruct(cli, tmp_path, heldout_ids):
    ppl = {}
    for init, extra in (("copy", []), ("calibrated", []), ("reconstruct", ["--reconstruct-steps", 25])):
        out = tmp_path / init
        assert cli("convert", "--layout", "fusedkv", "--init", init, "--out", out, *extra) == 0
        ppl[init] = perplexity(out, heldout_ids)
    source = perplexity(None, heldout_ids)
    # A correct conversion of a pretrained model is far from the source at step 0 ...
    assert ppl["copy"] > 100 * source
    # ... and each cheaper-than-training initialization recovers part of the gap.
    assert ppl["calibrated"] < ppl["copy"]
    assert ppl["reconstruct"] < ppl["calibrated"]
