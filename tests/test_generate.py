"""run.py generate: the source's own text, reproducible, resumable, usable as kd data."""
import json

import pytest

from common.sources import load_tokenizer
from uptrain.data import prepare_data
from uptrain.generate import GenerateOptions, run
from uptrain.recipe import load_recipe


def records(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_generated_text_is_reproducible_and_resumes_where_it_stopped(make_source, tmp_path):
    source = make_source()
    options = dict(source=str(source), samples=5, tokens=6, batch=2, seed=3)
    whole = run(GenerateOptions(out=str(tmp_path / "whole.jsonl"), **options))
    texts = records(whole.path)
    assert len(texts) == 5 and len(set(texts)) == 5 and 0 < whole.tokens <= 5 * 6
    # interrupted after one batch and a torn line: the rerun keeps the batch and redoes the rest
    resumed = tmp_path / "resumed.jsonl"
    lines = whole.path.read_text().splitlines(keepends=True)
    (tmp_path / "resumed.jsonl.partial").write_text("".join(lines[:2]) + lines[2][:7])
    run(GenerateOptions(out=str(resumed), **options))
    assert records(resumed) == texts and not (tmp_path / "resumed.jsonl.partial").exists()


def test_prompts_go_through_the_chat_template(make_source, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a color.\n\nCount to three.\n")
    out = run(GenerateOptions(out=str(tmp_path / "chat.jsonl"), source=str(make_source()), samples=3, tokens=4,
                              prompts=str(prompts), batch=3)).path
    texts = records(out)
    assert [t.count("Name a color.") for t in texts] == [1, 0, 1] and "Count to three." in texts[1]
    assert all(t.startswith("<|im_start|>") for t in texts)


def test_bad_input_is_one_line(cli, tmp_path, capsys):
    assert cli("generate", "--out", tmp_path / "x.jsonl", "--prompts", tmp_path / "none.txt") == 2
    assert cli("generate", "--out", tmp_path / "x.jsonl", "--samples", "0") == 2
    (tmp_path / "x.jsonl").write_text("{}\n")
    assert cli("generate", "--out", tmp_path / "x.jsonl") == 2
    err = capsys.readouterr().err
    assert "prompts file" in err and "does not exist" in err and "samples must be >= 1, got 0" in err
    assert "exists; pass --force" in err and "Traceback" not in err


def test_generated_text_is_uptraining_data(make_source, tmp_path):
    source = make_source()
    data = run(GenerateOptions(out=str(tmp_path / "self.jsonl"), source=str(source), samples=8, tokens=8, batch=8)).path
    recipe = load_recipe(None, flags={"data": str(data), "seq_len": 8, "eval_tokens": 8, "token_cache": str(tmp_path / "t")})
    store = prepare_data(recipe, load_tokenizer(source)).stores[0]
    eos = load_tokenizer(source).eos_token_id
    assert (store.tokens == eos).sum() == 8  # eight documents, each closed by EOS


@pytest.mark.parametrize("case,message", [
    ("out-a-folder", "is a folder; give the .jsonl file to write"),
    ("out-under-a-file", "is a file, not a folder"),
    ("out-inside-the-source", "is inside the input source"),
    ("prompts-not-text", "is not UTF-8 text"),
])
def test_bad_outputs_and_prompts_are_refused_before_generating(case, message, make_source, cli, tmp_path, capsys):
    source = make_source()
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "prompts.txt").write_bytes(bytes(range(128, 256)) * 4)
    out = {"out-a-folder": tmp_path / "folder", "out-under-a-file": tmp_path / "afile" / "g.jsonl",
           "out-inside-the-source": source / "g.jsonl"}.get(case, tmp_path / "g.jsonl")
    extra = ["--prompts", tmp_path / "prompts.txt"] if case == "prompts-not-text" else []
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert cli("generate", "--source", source, "--out", out, "--force", "--samples", 2, "--tokens", 2, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
