"""validate: perplexity against a hand computation, verdicts and exit codes, KV bytes, reports."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from common.sources import load_tokenizer
from validate.bootstrap import ratio_interval
from validate.perplexity import WindowScores, score_windows, windows

TEXT = ("The river town grew up around a ford where the water ran shallow over a bed of flat stones. " * 12).strip()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text(TEXT)
    return path


def validate_args(source, candidate, text_file, out, *extra):
    return ["validate", "--source", source, "--candidate", candidate, "--data", text_file, "--max-tokens", 0,
            "--context", 32, "--stride", 16, "--decode-lengths", "8,16", "--decode-new-tokens", 4,
            "--bootstrap", 200, "--out", out, *extra]


def report(out):
    return json.loads((out / "report.json").read_text())


def perturbed_copy(src, dest, scale):
    shutil.copytree(src, dest)
    state = load_file(dest / "model.safetensors")
    torch.manual_seed(1)
    for key in state:
        if "embed_tokens" in key:  # sharper, wrong logits: a clearly worse model
            state[key] = state[key] + scale * torch.randn_like(state[key])
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def hand_perplexity(model, ids, context, stride):
    """Token-by-token reference: each token after the first is scored once, with the left context
    of the window that first reaches it."""
    total, count, scored_until = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        logits = model(ids[begin:end][None]).logits[0]
        for pos in range(max(scored_until, begin + 1), end):
            total -= F.log_softmax(logits[pos - begin - 1], -1)[ids[pos]].item()
            count += 1
        scored_until = end
        if end == len(ids):
            break
    return math.exp(total / count)


@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5), (64, 64)])
def test_strided_perplexity_equals_hand_computation(make_source, context, stride):
    model = AutoModelForCausalLM.from_pretrained(make_source()).eval()
    ids = torch.randint(0, 49152, (41,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hand_perplexity(model, ids, context, stride)
    scores = score_windows(model, ids, context, stride)
    # Every token after the first is scored once; without overlap a window's first token has no context.
    unscored_window_starts = len(scores.count) - 1 if stride == context else 0
    assert scores.count.sum() == len(ids) - 1 - unscored_window_starts
    assert math.isclose(scores.perplexity, expected, rel_tol=1e-5)


def test_windows_cover_every_token_once():
    spans = windows(100, 30, 7)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, 100))


def test_bootstrap_interval_brackets_the_ratio():
    rng = torch.Generator().manual_seed(0)
    ref = WindowScores(torch.rand(50, generator=rng).numpy() * 100 + 200, torch.full((50,), 64).numpy())
    cand = WindowScores(ref.nll * 1.05, ref.count)
    low, high = ratio_interval(cand, ref, samples=500)
    ratio = cand.perplexity / ref.perplexity
    assert low <= ratio <= high and low > 1.0


def test_identical_models_pass_with_ratio_one(make_source, cli, text_file, tmp_path):
    src = make_source()
    out = tmp_path / "report"
    assert cli(*validate_args(src, src, text_file, out)) == 0
    r = report(out)
    assert r["verdict"]["pass"] and r["texts"][0]["comparison"]["ratio"] == 1.0
    assert (out / "report.md").read_text().startswith("# Validation report")


def test_perturbed_candidate_fails_with_exit_1(make_source, cli, text_file, tmp_path):
    src = make_source()
    bad = perturbed_copy(src, tmp_path / "bad", scale=0.5)
    out = tmp_path / "report"
    assert cli(*validate_args(src, bad, text_file, out)) == 1
    comparison = report(out)["texts"][0]["comparison"]
    assert not comparison["pass"] and comparison["ratio"] > 1.01


def test_control_becomes_the_reference(make_source, cli, text_file, tmp_path):
    src = make_source()
    other = perturbed_copy(src, tmp_path / "other", scale=0.5)
    ppl = {}
    for name, path in (("src", src), ("other", other)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        ids = torch.tensor(load_tokenizer(src)(TEXT)["input_ids"])
        ppl[name] = score_windows(model, ids, 32, 16).perplexity
    better, worse = (src, other) if ppl["src"] < ppl["other"] else (other, src)
    out = tmp_path / "report"
    # the candidate equals the source (passes against it) but is worse than the control
    assert cli(*validate_args(worse, worse, text_file, out, "--control", better)) == 1
    r = report(out)
    assert r["verdict"]["reference"] == "control" and set(r["models"]) == {"source", "candidate", "control"}
    assert r["texts"][0]["comparison"]["ratio"] > 1.01


def test_mismatched_tokenizers_exit_2(make_source, cli, text_file, tmp_path, capsys):
    from common.sources import load_tokenizer

    src = make_source()
    other = tmp_path / "other"
    shutil.copytree(src, other)
    tok = load_tokenizer(other)
    tok.add_tokens(["<brand-new-token>"])
    tok.save_pretrained(other)
    assert cli(*validate_args(src, other, text_file, tmp_path / "r")) == 2
    assert "tokenizer differs" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1", None])
def test_measured_kv_bytes_equal_the_arithmetic(make_source, cli, text_file, tmp_path, layout):
    src = make_source(layers=5)
    candidate = src
    if layout:
        candidate = tmp_path / layout
        assert cli("convert", "--source", src, "--layout", layout, "--out", candidate) == 0
    out = tmp_path / "report"
    cli(*validate_args(src, candidate, text_file, out))
    models = report(out)["models"]
    for role in ("source", "candidate"):
        assert models[role]["kv_bytes_per_token_measured"] == models[role]["kv_bytes_per_token_arithmetic"]
    head = 8 * 4  # head_dim 8, fp32
    expected = {"fusedkv": 3 * 2 * 2 * head, "fusedkv_lite": 3 * 2 * 2 * head,
                "skipv1": (5 * 2 + 2 + 4 * 1) * head, None: 5 * 2 * 2 * head}[layout]
    assert models["candidate"]["kv_bytes_per_token_measured"] == expected


def test_default_texts_are_in_domain_and_out_of_domain(make_source, cli, tmp_path):
    src = make_source()
    out = tmp_path / "report"
    assert cli("validate", "--source", src, "--candidate", src, "--max-tokens", 64, "--context", 32, "--stride", 32,
               "--decode-lengths", "8", "--out", out) == 0
    assert [t["name"] for t in report(out)["texts"]] == ["wikitext-2/test", "ood/python-docs"]


def test_bad_inputs_exit_2(make_source, cli, tmp_path, capsys):
    src = make_source()
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert cli("validate", "--source", src, "--candidate", tmp_path / "missing") == 2
    assert cli("validate", "--source", src, "--candidate", src, "--data", empty, "--out", tmp_path / "r") == 2
    assert cli("validate", "--source", src, "--candidate", src, "--stride", 0) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint folder" in err and "holds no text" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
