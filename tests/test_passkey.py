"""Passkey retrieval: prompts of the exact length with the key at the asked depth, exact-match scoring,
the table in report.json/report.md, answers through the candidate's own shared cache."""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from common.sources import load_tokenizer
from validate import passkey

SMALL = ["--max-tokens", 48, "--context", 32, "--stride", 16, "--decode-lengths", "8", "--decode-new-tokens", 2,
         "--bootstrap", 50]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("length", [100, 257, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_the_exact_length_and_the_key_at_its_depth(tokenizer, length, depth):
    ids, needle_at, fill = passkey.build_prompt(tokenizer, length, depth, "40817")
    assert len(ids) + passkey.answer_tokens(tokenizer) == length
    needle = tokenizer(passkey.NEEDLE.format(key="40817"), add_special_tokens=False)["input_ids"]
    assert ids[needle_at:needle_at + len(needle)] == needle
    assert tokenizer.decode(ids).count("40817") == 2  # stated twice in the needle, nowhere else
    sentence = len(tokenizer(passkey.FILLER, add_special_tokens=False)["input_ids"])
    intro = len(tokenizer(passkey.INTRO)["input_ids"])
    before = needle_at - intro  # filler tokens before the key
    assert abs(before - depth * fill) <= sentence / 2 + 1  # the nearest sentence boundary (or the filler's end)
    assert before % sentence == 0 or before == fill
    assert tokenizer.decode(ids).endswith(passkey.QUESTION)


def test_prompts_are_seeded_and_keys_vary(tokenizer):
    first = passkey.build_prompts(tokenizer, [128, 192], [0.0, 1.0], 3, seed=0)
    again = passkey.build_prompts(tokenizer, [128, 192], [0.0, 1.0], 3, seed=0)
    other = passkey.build_prompts(tokenizer, [128, 192], [0.0, 1.0], 3, seed=1)
    assert [p.ids for p in first] == [p.ids for p in again] and len(first) == 12
    assert len({p.key for p in first}) > 1 and [p.key for p in first] != [p.key for p in other]
    assert all(len(p.key) == passkey.KEY_DIGITS for p in first)


@pytest.mark.parametrize("answer,correct", [(" 40817. Remember", True), ("40817", True), (" the key is 40817", True),
                                            (" 4081", False), (" 408170", False), (" 40818", False), ("", False),
                                            (" 4 0817", False)])
def test_exact_match_on_the_first_number(answer, correct):
    assert passkey.is_correct(answer, "40817") is correct


class NearSighted:
    """A stub model that reads only its last `reach` prompt tokens: it repeats the key when the needle
    lies within them, and writes 00000 when not. Its cache holds one float per token."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, reach):
        self.tokenizer, self.reach = tokenizer, reach

    def generate(self, ids, max_new_tokens, **_):
        seen = self.tokenizer.decode(ids[0, -self.reach:]) if self.reach else ""
        found = re.search(r"pass key is (\d+)\.", seen)
        answer = self.tokenizer(f" {found.group(1) if found else '00000'}.", add_special_tokens=False)["input_ids"]
        cache = DynamicCache()
        cache.update(torch.zeros(1, 1, ids.shape[1], 1), torch.zeros(1, 1, ids.shape[1], 0), 0)
        return SimpleNamespace(sequences=torch.cat([ids, torch.tensor([answer[:max_new_tokens]])], 1),
                               past_key_values=cache)


def test_accuracy_table_follows_what_the_model_can_see(tokenizer):
    prompts = passkey.build_prompts(tokenizer, [128, 256, 512], [0.0, 0.5, 1.0], 2, seed=0)
    reach = 160
    results = {"source": passkey.evaluate(NearSighted(tokenizer, 10_000), tokenizer, prompts),
               "candidate": passkey.evaluate(NearSighted(tokenizer, reach), tokenizer, prompts)}
    table = passkey.table(results)
    assert all(row["accuracy"]["source"] == 1.0 for row in table["by_length_depth"])
    for row in table["by_length_depth"]:
        cell = [p for p in prompts if (p.length, p.depth) == (row["length"], row["depth"])]
        visible = [re.search(rf"pass key is {p.key}\.", tokenizer.decode(p.ids[-reach:])) for p in cell]
        expected = sum(v is not None for v in visible) / len(cell)
        assert row["accuracy"]["candidate"] == expected
    cells = {(r["length"], r["depth"]): r["accuracy"]["candidate"] for r in table["by_length_depth"]}
    assert cells[(512, 0.0)] == 0.0 and cells[(512, 1.0)] == 1.0 and cells[(128, 0.0)] == 1.0
    assert table["by_length"][-1]["accuracy"]["candidate"] == pytest.approx(1 / 3)
    assert table["kv_bytes_per_token"]["candidate"] == 4.0
    md = passkey.markdown_lines({"passkey": table, "models": {"source": {}, "candidate": {}}})
    assert "| 512 | 0 | 1.00 | 0.00 |" in md and "| 512 | all | **1.00** | **0.33** |" in md


def test_validate_reports_passkey_through_the_candidates_shared_cache(make_source, cli, tmp_path, capsys):
    src = make_source()
    candidate = tmp_path / "fusedkv"
    assert cli("convert", "--source", src, "--layout", "fusedkv", "--out", candidate) == 0
    text = tmp_path / "heldout.txt"
    text.write_text("The river town grew up around a ford where the water ran shallow. " * 8)
    out = tmp_path / "report"
    code = cli("validate", "--source", src, "--candidate", candidate, "--data", text, "--out", out, *SMALL,
               "--passkey-lengths", "128,192", "--passkey-depths", "0,1", "--passkey-trials", 2)
    assert code in (0, 1), capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    table = report["passkey"]
    assert table["lengths"] == [128, 192] and table["depths"] == [0.0, 1.0] and table["trials"] == 2
    for role in ("source", "candidate"):
        answers = table["answers"][role]
        assert len(answers) == 8 and [a["key"] for a in answers] == [a["key"] for a in table["answers"]["source"]]
        assert all(a["correct"] == passkey.is_correct(a["answer"], a["key"]) for a in answers)
        for row in table["by_length_depth"]:
            cell = [a["correct"] for a in answers if (a["length"], a["depth"]) == (row["length"], row["depth"])]
            assert row["accuracy"][role] == sum(cell) / 2
        # generate() answered from the layout's own cache: its bytes are the layout's arithmetic
        assert table["kv_bytes_per_token"][role] == report["models"][role]["kv_bytes_per_token_arithmetic"]
    assert table["kv_bytes_per_token"]["candidate"] < table["kv_bytes_per_token"]["source"]
    md = (out / "report.md").read_text()
    assert "## Passkey retrieval" in md and "| 192 | 1 |" in md and "| 128 | all |" in md
    assert (out / "passkey.png").stat().st_size > 0


@pytest.mark.parametrize("extra,message", [
    pytest.param(["--passkey-lengths", "128,1024"], "--passkey-lengths 1024 is longer than the source's "
                 "max_position_embeddings 512", id="past-max-positions"),
    pytest.param(["--passkey-depths", "0.5,1.5"], "--passkey-depths within [0, 1]", id="depth-outside-0-1"),
    pytest.param(["--passkey", "--passkey-trials", 0], "passkey_trials must be >= 1, got 0", id="no-trials"),
    pytest.param(["--passkey-lengths", "128,x"], "must be numbers separated by commas", id="not-a-number"),
    pytest.param(["--passkey-lengths", "40"], "--passkey-lengths 40 leaves no room for filler text", id="too-short"),
])
def test_bad_passkey_flags_exit_2_before_any_model_loads(extra, message, make_source, cli, tmp_path, capsys,
                                                         monkeypatch):
    def loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr("validate.stage.load_causal_lm", loading)
    src = make_source()
    text = tmp_path / "heldout.txt"
    text.write_text("Some held-out text. " * 20)
    assert cli("validate", "--source", src, "--candidate", src, "--data", text, "--out", tmp_path / "r",
               *SMALL, *extra) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in " ".join(err.split())
    assert not (tmp_path / "r").exists()
