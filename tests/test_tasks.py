"""lm-evaluation-harness wiring: a local multiple-choice task (YAML + JSONL written here) scored on tiny
models, accuracies checked against log-likelihoods computed here, paired differences, the verdict."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.sources import load_causal_lm, load_tokenizer
from tests.test_validate import fake_args, fake_model, perturbed_copy
from validate.stage import build_report

SMALL = ["--max-tokens", 48, "--context", 32, "--stride", 16, "--decode-lengths", "8", "--decode-new-tokens", 2,
         "--bootstrap", 50]
QUESTIONS = [
    ("The colour of a clear sky is", ["blue", "green", "loud"], 0),
    ("Water freezes when it is", ["hot", "cold", "purple"], 1),
    ("A cat says", ["moo", "woof", "meow"], 2),
    ("The opposite of up is", ["down", "left", "sideways"], 0),
    ("Two plus two equals", ["five", "four", "three"], 1),
    ("Fish live in", ["trees", "deserts", "water"], 2),
    ("The sun rises in the", ["east", "west", "cellar"], 0),
    ("Ice cream is usually", ["boiling", "cold", "metallic"], 1),
    ("A week has seven", ["hours", "months", "days"], 2),
    ("Birds can", ["fly", "read", "drive"], 0),
    ("Snow is", ["black", "white", "orange"], 1),
    ("We see with our", ["ears", "knees", "eyes"], 2),
]
TASK_YAML = """task: tinyqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
HUB_TASK_YAML = """task: hubqa
dataset_path: kvshare-test/no-such-dataset
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tinyqa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in QUESTIONS))
    (folder / "tinyqa.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "hf-cache"))
    return folder


@torch.inference_mode()
def hand_accuracy(path) -> dict[str, list[float]]:
    """Per-question acc and acc_norm from the model's own log-likelihoods of ' ' + choice after the prompt."""
    model, tokenizer = load_causal_lm(path), load_tokenizer(path)
    acc, acc_norm = [], []
    for question, choices, label in QUESTIONS:
        context = tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(f"Question: {question}\nAnswer: {choice}", add_special_tokens=False)["input_ids"]
            logp = F.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        acc.append(float(np.argmax(scores) == label))
        acc_norm.append(float(np.argmax([s / len(c) for s, c in zip(scores, choices)]) == label))
    return {"acc": acc, "acc_norm": acc_norm}


def test_task_accuracy_and_paired_difference_match_a_hand_computation(make_source, cli, task_dir, text_file,
                                                                      tmp_path, capsys):
    src = make_source()
    candidate = perturbed_copy(src, tmp_path / "candidate", scale=0.5)
    out = tmp_path / "report"
    code = cli("validate", "--source", src, "--candidate", candidate, "--data", text_file, "--out", out, *SMALL,
               "--tasks", "tinyqa", "--tasks-path", task_dir)
    assert code in (0, 1), capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    hand = {"source": hand_accuracy(src), "candidate": hand_accuracy(candidate)}
    entries = {e["metric"]: e for e in report["tasks"]}
    assert set(entries) == {"acc", "acc_norm"}
    for metric, entry in entries.items():
        assert entry["task"] == "tinyqa" and entry["examples"] == len(QUESTIONS)
        for role in ("source", "candidate"):
            values = hand[role][metric]
            assert entry["accuracy"][role] == pytest.approx(np.mean(values))
            assert entry["stderr"][role] == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
        diff = np.subtract(hand["candidate"][metric], hand["source"][metric])
        assert entry["difference"]["reference"] == "source"
        assert entry["difference"]["value"] == pytest.approx(diff.mean())
        assert entry["difference"]["stderr"] == pytest.approx(diff.std(ddof=1) / math.sqrt(len(diff)))
        assert entry["pass"] is None  # no --max-accuracy-drop: reported, not judged
    assert hand["source"]["acc"] != hand["candidate"]["acc"]  # the perturbation changed answers: a real comparison
    md = (out / "report.md").read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in md
    assert f"| tinyqa | acc | {len(QUESTIONS)} | {np.mean(hand['source']['acc']):.4f} ± " in md


def tasks_model(nll, acc_docs):
    model = fake_model(nll)
    model["tasks"] = {"tinyqa": {"acc": {"value": float(np.mean(acc_docs)), "stderr": None, "docs": acc_docs}}}
    return model


@pytest.mark.parametrize("max_drop,passes", [(None, True), (0.30, True), (0.25, True), (0.2, False), (0.0, False)])
def test_verdict_fails_past_the_maximum_accuracy_drop(max_drop, passes):
    ppl = [[20.0] * 8]
    token_sets = [("text", torch.zeros(90))]
    reference = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]  # 0.625
    candidate = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]  # 0.375: 25 points below
    report = build_report(fake_args(max_accuracy_drop=max_drop), token_sets,
                          {"source": tasks_model(ppl, reference), "candidate": tasks_model(ppl, candidate)})
    entry = report["tasks"][0]
    assert entry["difference"]["value"] == pytest.approx(-0.25)
    assert entry["difference"]["stderr"] == pytest.approx(np.std([0, -1, 0, 0, -1, 0, 0, 0], ddof=1) / math.sqrt(8))
    assert report["verdict"]["pass"] is passes and report["verdict"]["exit_code"] == (0 if passes else 1)
    assert entry["pass"] is (None if max_drop is None else passes)
    if max_drop is not None:
        assert "accuracy" in report["verdict"]["rule"] and "tinyqa" in report["verdict"]["summary"] or passes


def test_control_is_the_reference_for_tasks():
    ppl = [[20.0] * 8]
    models = {"source": tasks_model(ppl, [1.0] * 4), "control": tasks_model(ppl, [0.0] * 4),
              "candidate": tasks_model(ppl, [1.0, 0.0, 0.0, 0.0])}
    entry = build_report(fake_args(max_accuracy_drop=0.0), [("text", torch.zeros(90))], models)["tasks"][0]
    assert entry["difference"] == {"reference": "control", "value": 0.25, "stderr": pytest.approx(0.25)}
    assert entry["difference_vs_source"]["value"] == -0.75 and entry["pass"] is True


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error:"), err
    return lines[-1]


@pytest.mark.parametrize("case,message", [
    ("unknown-task", "unknown task 'no_such_task': not in lm-eval's tasks or"),
    ("hub-unreachable", "task hubqa: its data cannot be read (Couldn't reach 'kvshare-test/no-such-dataset' on the Hub"),
    ("missing-file", "task tinyqa: its data cannot be read"),
    ("drop-without-tasks", "--max-accuracy-drop needs --tasks"),
    ("bad-drop", "max_accuracy_drop must be >= 0 and <= 1, got 5.0"),
    ("no-lm-eval", "--tasks needs lm-evaluation-harness: run `.venv/bin/pip install lm-eval==0.4.13`"),
])
def test_bad_tasks_exit_2_in_one_line_before_any_model_loads(case, message, make_source, cli, task_dir, text_file,
                                                            tmp_path, capsys, monkeypatch):
    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the tasks were checked")

    monkeypatch.setattr("validate.stage.load_causal_lm", loading)
    monkeypatch.setattr("validate.tasks.hub_reachable", lambda: False)  # as on a machine without network
    extra = ["--tasks", "tinyqa", "--tasks-path", task_dir]
    if case == "unknown-task":
        extra[1] = "tinyqa,no_such_task"
    elif case == "hub-unreachable":
        (task_dir / "hubqa.yaml").write_text(HUB_TASK_YAML)
        extra[1] = "hubqa"
    elif case == "missing-file":
        (task_dir / "tinyqa.jsonl").unlink()
    elif case == "drop-without-tasks":
        extra = ["--max-accuracy-drop", 0.01]
    elif case == "bad-drop":
        extra += ["--max-accuracy-drop", 5]
    elif case == "no-lm-eval":
        monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import lm_eval raises ImportError
    src = make_source()
    assert cli("validate", "--source", src, "--candidate", src, "--data", text_file, "--out", tmp_path / "r",
               *SMALL, *extra) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "r").exists()
