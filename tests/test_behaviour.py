"""validate --behaviour: teacher-forced next-token agreement and KL against the source's greedy answers,
checked against a hand computation, the --min-agreement verdict, and bad prompt sets refused in one line."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from common.sources import load_causal_lm, load_tokenizer
from tests.test_validate import perturbed_copy
from validate import behaviour
from validate.samples import prompt_ids

PROMPTS = ["Hi", "What is the capital of France?", "Name three colors.",
           "Write one long sentence about the sea, the sand and the gulls."]  # lengths differ: left padding is used
TOKENS = 6
PERTURBATION = 0.003  # on the tiny model's embeddings: about half of its argmaxes move
SMALL = ["--max-tokens", 48, "--context", 32, "--stride", 16, "--decode-lengths", "8", "--decode-new-tokens", 2,
         "--bootstrap", 50, "--behaviour-tokens", TOKENS]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")
    return path


def validate(cli, source, candidate, text_file, out, *extra):
    code = cli("validate", "--source", source, "--candidate", candidate, "--data", text_file, "--out", out,
               *SMALL, *extra)
    return code, json.loads((out / "report.json").read_text())


def test_shipped_prompt_set_has_over_100_distinct_prompts():
    prompts = behaviour.read_prompts(None)
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts) and all(prompts)


def test_identical_candidate_agrees_everywhere_with_zero_kl(make_source, cli, text_file, tmp_path):
    src = make_source()
    same = shutil.copytree(src, tmp_path / "same")  # a different folder: both are loaded and scored
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "report"
    code, report = validate(cli, src, same, text_file, out, "--behaviour-prompts", prompts, "--min-agreement", 1.0)
    section = report["behaviour"]
    assert code == 0 and report["verdict"]["pass"]
    assert section["prompts"] == len(PROMPTS) and section["tokens"] == TOKENS
    assert section["positions"] == len(PROMPTS) * TOKENS  # a random model writes no stop token
    assert section["agreement"] == {"candidate": 1.0} and section["kl"]["candidate"] < 1e-6
    assert all(p["agreement"]["candidate"] == 1.0 for p in section["per_prompt"])
    assert "behaviour agreement 1.0000 (min 1)" in report["verdict"]["summary"]
    md = (out / "report.md").read_text()
    assert "| behaviour: next-token agreement | - | 1.0000 |" in md and "-> PASS" in md


def test_perturbed_candidate_kl_equals_a_hand_computation(make_source, tmp_path, monkeypatch):
    monkeypatch.setattr(behaviour, "ANSWER_BATCH", 3)  # two answer batches, three scoring slices: the bookkeeping
    monkeypatch.setattr(behaviour, "SCORE_BATCH", 2)
    src_path = make_source(tied=False)  # tied: the argmax repeats the input token, whatever the perturbation
    tokenizer = load_tokenizer(src_path)
    source = load_causal_lm(src_path, attn_implementation="sdpa")
    bad = load_causal_lm(perturbed_copy(src_path, tmp_path / "bad", PERTURBATION), attn_implementation="sdpa")
    with torch.no_grad():  # sharper distributions (the argmax stays): KL(p||q) far from KL(q||p) and from rounding
        for model in (source, bad):
            model.lm_head.weight.mul_(30)
    check = behaviour.Check(tokenizer, PROMPTS, TOKENS)
    answers = check.evaluate(source, "source")["answers"]
    result = check.evaluate(bad, "candidate")
    assert 0 < result["agreement"] < 1 and result["kl"] > 0
    assert result["kl"] == pytest.approx(sum(result["per_prompt_kl"]) / len(PROMPTS), rel=1e-6)  # same counts each

    for i, prompt in enumerate(PROMPTS):  # by hand: one prompt at a time, no padding
        ids = prompt_ids(tokenizer, prompt)["input_ids"]
        with torch.no_grad():
            full = source.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
            assert full.shape[1] == ids.shape[1] + TOKENS and tokenizer.eos_token_id not in full[0, ids.shape[1]:]
            log_p, log_q = (F.log_softmax(model(full).logits[0, -TOKENS - 1:-1], -1) for model in (source, bad))
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
        agreement = (log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item()
        assert answers[i] == tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
        assert result["per_prompt_kl"][i] == pytest.approx(kl, rel=1e-5)  # KL(q||p) is 1% away
        assert result["per_prompt_agreement"][i] == pytest.approx(agreement)


def test_positions_after_the_first_stop_token_are_not_scored(make_source, monkeypatch):
    src_path = make_source(tied=False)
    tokenizer, model = load_tokenizer(src_path), load_causal_lm(src_path, attn_implementation="sdpa")

    def answer(prompt, stops):
        ids = prompt_ids(tokenizer, prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.eos_token_id)
        return out[0, ids.shape[1]:].tolist()

    stop = answer(PROMPTS[0], None)[2]  # the third token the source writes to the first prompt ends its answers now
    monkeypatch.setattr(behaviour, "stop_ids", lambda model, tokenizer: [stop])
    check = behaviour.Check(tokenizer, PROMPTS, TOKENS)
    source = check.evaluate(model, "source")
    by_hand = [answer(prompt, [stop]) for prompt in PROMPTS]
    assert len(by_hand[0]) <= 3 and by_hand[0][-1] == stop
    assert source["positions"] == sum(len(a) for a in by_hand) < len(PROMPTS) * TOKENS  # each up to its stop token
    assert source["answers"] == [tokenizer.decode(a, skip_special_tokens=True) for a in by_hand]
    assert check.evaluate(model, "candidate")["agreement"] == 1.0


def test_agreement_below_min_agreement_fails_with_exit_1(make_source, cli, text_file, prompt_file, tmp_path):
    """(At or above it passes: the identical candidate above, with --min-agreement 1.)"""
    src = make_source(tied=False)
    bad = perturbed_copy(src, tmp_path / "bad", PERTURBATION)
    code, report = validate(cli, src, bad, text_file, tmp_path / "report", "--behaviour-prompts", prompt_file,
                            "--tolerance", 1e9, "--min-agreement", 0.99)  # perplexity passes: behaviour decides
    assert code == 1 and not report["verdict"]["pass"] and report["behaviour"]["pass"] is False
    assert 0 < report["behaviour"]["agreement"]["candidate"] < 0.99
    assert "behaviour agreement" in report["verdict"]["summary"] and ">= 0.99" in report["verdict"]["rule"]
    assert "vs min 0.99 -> FAIL" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("extra,message", [
    pytest.param(["--behaviour-prompts", "missing.txt"], "missing.txt does not exist", id="missing-file"),
    pytest.param(["--behaviour-prompts", "empty.txt"], "holds no prompt", id="empty-file"),
    pytest.param(["--behaviour-prompts", "prompts.csv"], "give a .txt file", id="not-txt-or-jsonl"),
    pytest.param(["--behaviour-prompts", "no-field.jsonl"], 'line 2 has no "prompt" text', id="jsonl-without-prompt"),
    pytest.param(["--behaviour-prompts", "broken.jsonl"], "line 1 is not JSON", id="jsonl-not-json"),
    pytest.param(["--behaviour-tokens", 0], "behaviour_tokens must be >= 1, got 0", id="no-tokens"),
    pytest.param(["--min-agreement", 1.5], "min_agreement must be >= 0 and <= 1, got 1.5", id="agreement-above-1"),
    pytest.param(["--behaviour-tokens", 600], "more than the source's max_position_embeddings 512",
                 id="past-max-positions"),
])
def test_bad_behaviour_input_exits_2_before_any_model_loads(extra, message, make_source, cli, text_file, tmp_path,
                                                            capsys, monkeypatch):
    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the behaviour options were checked")

    monkeypatch.setattr("validate.stage.load_causal_lm", loading)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "prompts.csv").write_text("prompt\nHi\n")
    (tmp_path / "no-field.jsonl").write_text('{"prompt": "Hi"}\n{"text": "Hi"}\n')
    (tmp_path / "broken.jsonl").write_text('{"prompt": "Hi"\n')
    src = make_source()
    capsys.readouterr()  # what saving the tiny source printed
    assert cli("validate", "--source", src, "--candidate", src, "--data", text_file, "--out", tmp_path / "r",
               *SMALL, *extra) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "r").exists()
