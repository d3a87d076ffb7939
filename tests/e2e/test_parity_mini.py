"""Parity regression on a source whose pretraining compute is known: `make demo`'s mini source
(data/mini-sources/demo, 0.56M parameters pretrained here, bench/parity_study.py --shape demo) converted
to FusedKV, uptrained with the papers' budget (15% of its pretraining tokens) by the mini recipe, and
judged by validate. A bug in the loss, the schedule, the conversion or the export that costs recovery
moves the ratio past the bound, measured here with a margin."""
import json
from pathlib import Path

from common import code_corpus

ROOT = Path(__file__).resolve().parent.parent.parent
MINI = ROOT / "data" / "mini-sources" / "demo"
SHARE = 0.15  # of the source's pretraining tokens: 103 steps, about two minutes of training (3.5 min in all)
# FusedKV / source on held-out code after SHARE, measured on the project's 2-core machine: BOUND_MEASURED;
# the bound leaves room for another machine's float sums, not for a lost recovery (step 0 is far above).
BOUND_MEASURED = 0.987  # step 0: 1.123; the study's arm (fusedkv-reconstruct+kd+lr1x, full corpus) 0.971
BOUND = 1.002  # 1.5% above: another machine installs slightly other packages, so its corpus differs a little


def test_fusedkv_on_the_mini_source_recovers_to_the_measured_ratio(cli, tmp_path):
    corpus = tmp_path / "corpus"
    code_corpus.build(corpus, train_per_mille=30)
    converted, run, report = tmp_path / "fusedkv", tmp_path / "run", tmp_path / "report"
    fit = code_corpus.RECONSTRUCT_FIT  # the demo's and the study's
    assert cli("convert", "--source", MINI, "--layout", "fusedkv", "--init", "reconstruct",
               "--calib-text", code_corpus.calib_text(corpus), "--calib-tokens", fit["calib_tokens"],
               "--reconstruct-steps", fit["reconstruct_steps"], "--out", converted) == 0
    tokens = round(SHARE * json.loads((MINI / "pretraining.json").read_text())["tokens"])
    assert cli("uptrain", "--config", ROOT / "configs" / "uptrain-mini.yaml", "--set", f"model={converted}",
               "--set", f"source={MINI}", "--set", f"data={corpus / 'train.jsonl'}",
               "--set", f"eval_data={corpus / 'heldout.jsonl'}", "--set", f"out={run}",
               "--set", f"token_cache={tmp_path / 'tokens'}", "--set", f"budget={{tokens: {tokens}}}") == 0
    code = validate(cli, run / "final", code_corpus.eval_text(corpus), report)
    step0 = validate(cli, converted, code_corpus.eval_text(corpus), tmp_path / "report0")
    assert step0 > BOUND + 0.05  # the conversion alone is well above: the bound tests the training
    assert code <= BOUND, f"FusedKV / source on held-out code {code:.4f} > {BOUND} (measured {BOUND_MEASURED})"


def validate(cli, candidate: Path, text: Path, out: Path) -> float:
    """candidate / source perplexity on held-out code (exit 1 is a FAIL verdict: the ratio still counts)."""
    assert cli("validate", "--source", MINI, "--candidate", candidate, "--data", text, "--max-tokens", 16384,
               "--context", 256, "--stride", 256,
               "--decode-lengths", 128, "--decode-new-tokens", 2, "--bootstrap", 200, "--out", out) in (0, 1)
    return json.loads((out / "report.json").read_text())["texts"][0]["comparison"]["ratio"]
