"""validate: perplexity against a hand computation, verdicts and exit codes, KV bytes, reports."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from common.sources import load_tokenizer
from models import SharedKVForCausalLM
from models.source_layout import shared_kv_config
from validate.bootstrap import ratio_interval
from validate.options import ValidateOptions
from validate.stage import build_report
from validate.perplexity import WindowScores, score_windows, windows

TEXT = ("The river town grew up around a ford where the water ran shallow over a bed of flat stones. " * 12).strip()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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


def layout_checkpoint(src, layout, dest):
    """A randomly initialised checkpoint of the layout, built from the source config, with its tokenizer."""
    torch.manual_seed(0)
    SharedKVForCausalLM(shared_kv_config(AutoConfig.from_pretrained(src), layout)).save_pretrained(dest)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dest / name)
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


@pytest.mark.parametrize("layout", [None, "fusedkv"])
@pytest.mark.parametrize("context,stride", [(16, 16), (16, 5), (64, 64)])
def test_strided_perplexity_equals_hand_computation(make_source, tmp_path, context, stride, layout):
    path = make_source()
    if layout:
        path = layout_checkpoint(path, layout, tmp_path / layout)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()  # a layout is remote code
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
    rng = np.random.default_rng(0)
    ref = WindowScores(rng.random(50) * 100 + 200, np.full(50, 64))
    cand = WindowScores(ref.nll * 1.05, ref.count)
    low, high = ratio_interval(cand, ref, samples=500)
    assert low <= cand.perplexity / ref.perplexity <= high and low > 1.0
    noisy = WindowScores(ref.nll + rng.normal(0, 5, 50), ref.count)  # no systematic difference
    low, high = ratio_interval(noisy, ref, samples=500)
    assert low < 1.0 < high


def fake_args(**kw):
    return ValidateOptions(**{**dict(candidate="x", bootstrap=200, decode_lengths=(8,), context=32, stride=16), **kw})


def fake_model(nll_per_text):
    return {"scores": [WindowScores(np.asarray(n, float), np.full(len(n), 10)) for n in nll_per_text],
            "path": "x", "parameters": 1, "decode": [{"decode_tokens_per_s": 1.0}],
            "kv_bytes_per_token_measured": 100, "kv_bytes_per_token_arithmetic": 100}


def test_verdict_needs_every_text_within_tolerance():
    ref = [[20.0] * 8, [30.0] * 8]
    token_sets = [("in-domain", torch.zeros(90)), ("out-of-domain", torch.zeros(90))]
    ok = build_report(fake_args(), token_sets, {"source": fake_model(ref), "candidate": fake_model(ref)})
    assert ok["verdict"]["pass"] and ok["verdict"]["exit_code"] == 0
    # in domain equal, out of domain exp(0.1) = 10.5% worse: the whole verdict fails
    worse_ood = [[20.0] * 8, [31.0] * 8]
    bad = build_report(fake_args(), token_sets, {"source": fake_model(ref), "candidate": fake_model(worse_ood)})
    assert [t["comparison"]["pass"] for t in bad["texts"]] == [True, False]
    assert not bad["verdict"]["pass"] and bad["verdict"]["exit_code"] == 1
    assert math.isclose(bad["texts"][1]["comparison"]["ratio"], math.exp(0.1))
    # a tolerance of 11% lets it through
    loose = build_report(fake_args(tolerance=0.11), token_sets,
                         {"source": fake_model(ref), "candidate": fake_model(worse_ood)})
    assert loose["verdict"]["pass"] and "every held-out text" in loose["verdict"]["rule"]


def test_identical_models_pass_with_ratio_one(make_source, cli, text_file, tmp_path):
    src = make_source()
    same = shutil.copytree(src, tmp_path / "same")  # a different folder: both are loaded and scored
    out = tmp_path / "report"
    assert cli(*validate_args(src, same, text_file, out)) == 0
    r = report(out)
    comparison = r["texts"][0]["comparison"]
    assert r["verdict"]["pass"] and comparison["ratio"] == 1.0
    assert comparison["ci_low"] == comparison["ci_high"] == 1.0 and not comparison["real_difference"]
    assert r["texts"][0]["perplexity"]["source"] == r["texts"][0]["perplexity"]["candidate"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Validation report") and "Verdict: **PASS**" in md and "Rule: PASS when" in md
    assert not list(out.glob(".*.tmp"))


def test_perturbed_candidate_fails_with_exit_1(make_source, cli, text_file, tmp_path):
    src = make_source()
    bad = perturbed_copy(src, tmp_path / "bad", scale=0.5)
    out = tmp_path / "report"
    assert cli(*validate_args(src, bad, text_file, out)) == 1
    comparison = report(out)["texts"][0]["comparison"]
    assert not comparison["pass"] and comparison["ratio"] > 1.01
    assert comparison["ci_low"] > 1.0 and comparison["real_difference"]
    assert "Verdict: **FAIL**" in (out / "report.md").read_text()


@pytest.fixture
def better_and_worse(make_source, tmp_path):
    """Two models on the same tokenizer, ordered by their perplexity on TEXT."""
    src = make_source()
    other = perturbed_copy(src, tmp_path / "other", scale=0.5)
    ids = torch.tensor(load_tokenizer(src)(TEXT)["input_ids"])
    ppl = {path: score_windows(AutoModelForCausalLM.from_pretrained(path).eval(), ids, 32, 16).perplexity
           for path in (src, other)}
    return sorted(ppl, key=ppl.get)


@pytest.mark.parametrize("case", ["passes source, fails control", "fails source, passes control"])
def test_control_is_the_reference(better_and_worse, cli, text_file, tmp_path, case):
    better, worse = better_and_worse
    source, control, expected = (worse, better, 1) if case.startswith("passes source") else (better, worse, 0)
    out = tmp_path / "report"
    assert cli(*validate_args(source, worse, text_file, out, "--control", control)) == expected
    r = report(out)
    text = r["texts"][0]
    assert r["verdict"]["reference"] == "control" and list(r["models"]) == ["source", "control", "candidate"]
    assert text["comparison"]["reference"] == "control"
    vs_control, vs_source = text["comparison"]["ratio"], text["candidate_vs_source"]["ratio"]
    if expected == 1:  # the candidate equals the source but is worse than the control
        assert vs_source == 1.0 and vs_control > 1.01
    else:  # the candidate is worse than the source but equals the control
        assert vs_source > 1.01 and vs_control == 1.0
    assert "the verdict uses the control" in (out / "report.md").read_text()


def lowercasing(folder):
    """Same vocabulary, different encodings: a lowercasing normalizer in front."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))


def added_token(folder):
    tok = load_tokenizer(folder)
    tok.add_tokens(["<brand-new-token>"])
    tok.save_pretrained(folder)


@pytest.mark.parametrize("change,reason", [(added_token, "vocabulary"), (lowercasing, "encodes")])
def test_mismatched_tokenizers_exit_2(make_source, cli, text_file, tmp_path, capsys, change, reason):
    src = make_source()
    other = shutil.copytree(src, tmp_path / "other")
    change(other)
    assert cli(*validate_args(src, other, text_file, tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "tokenizer differs" in err and reason in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("layout", ["fusedkv", "fusedkv_lite", "skipv1", None])
def test_measured_kv_bytes_equal_the_arithmetic(make_source, cli, text_file, tmp_path, layout):
    src = make_source(layers=5)
    candidate = layout_checkpoint(src, layout, tmp_path / layout) if layout else src
    out = tmp_path / "report"
    cli(*validate_args(src, candidate, text_file, out))
    models = report(out)["models"]
    for role in ("source", "candidate"):
        assert models[role]["kv_bytes_per_token_measured"] == models[role]["kv_bytes_per_token_arithmetic"]
        assert [d["cached_tokens"] for d in models[role]["decode"]] == [8 + 5, 16 + 5]  # prompt + warm-up + 4
    head = 8 * 4  # head_dim 8, fp32
    stored_heads = {"fusedkv": 3 * 2 * 2, "fusedkv_lite": 3 * 2 * 2, "skipv1": 5 * 2 + 2 + 4 * 1, None: 5 * 2 * 2}
    assert models["source"]["kv_bytes_per_token_measured"] == 5 * 2 * 2 * head
    assert models["candidate"]["kv_bytes_per_token_measured"] == stored_heads[layout] * head
    assert math.isclose(models["candidate"]["kv_saving_vs_source"], 1 - stored_heads[layout] / 20)


def test_default_texts_are_in_domain_and_out_of_domain(make_source, cli, tmp_path):
    src = make_source()
    out = tmp_path / "report"
    assert cli("validate", "--source", src, "--candidate", src, "--max-tokens", 64, "--context", 32, "--stride", 32,
               "--decode-lengths", "8", "--out", out) == 0
    texts = report(out)["texts"]
    assert [t["name"] for t in texts] == ["wikitext-2/test", "ood/python-docs"]
    assert [t["tokens"] for t in texts] == [64, 64] and all(t["comparison"]["pass"] for t in texts)
    md = (out / "report.md").read_text()
    assert "ppl wikitext-2/test" in md and "ppl ood/python-docs" in md


def test_bad_inputs_exit_2(make_source, cli, tmp_path, capsys):
    src = make_source()
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_text("x")
    out = tmp_path / "r"
    assert cli("validate", "--source", src, "--candidate", tmp_path / "missing", "--out", out) == 2
    assert cli("validate", "--source", src, "--candidate", not_a_model, "--out", out) == 2
    assert cli("validate", "--source", src, "--candidate", src, "--data", empty, "--decode-lengths", "8", "--out", out) == 2
    assert cli("validate", "--source", src, "--candidate", src, "--control", tmp_path / "nope", "--out", out) == 2
    assert cli("validate", "--source", src, "--candidate", src, "--stride", 0, "--out", out) == 2
    assert cli("validate", "--source", src, "--candidate", src, "--decode-lengths", "a,b", "--out", out) == 2
    assert cli("validate", "--source", src) == 2  # no --candidate
    err = capsys.readouterr().err
    assert "not a checkpoint folder" in err and "holds no text" in err and "decode_lengths must be an integer" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_the_printed_command_line_reproduces_the_options():
    """What the demo prints for a stage parses back to the same options (a path holding a comma included)."""
    import shlex

    import run
    from common.options import command_line, options_from_args
    from validate.options import FLAGS

    options = ValidateOptions(candidate="c", data=("a,b.txt", "x.jsonl"), decode_lengths=(8, 16), tolerance=0.05)
    argv = shlex.split(command_line("validate", options, FLAGS))[2:]  # after `python run.py`
    assert options_from_args(ValidateOptions, run.build_parser("validate").parse_args(argv), FLAGS) == options
