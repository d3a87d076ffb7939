"""The token store and the step sampler: the tokens of a straight tokenization, every source kind,
batches that depend only on (seed, step), damaged stores refused, one line for bad data specs."""
import json

import numpy as np
import pytest

from common.data import parse_spec, parse_specs
from common.errors import UserError
from common.sources import load_tokenizer
from uptrain.recipe import load_recipe
from uptrain.sampler import StepSampler, apportion, permute
from uptrain.token_store import open_store, prepare

DOCS = ["The first document is about cats.", "A second one, about dogs and their owners.",
        "Third: numbers 1 2 3 and symbols <>&.", "Fourth document, the last of them."]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def straight(tokenizer, docs):
    """Every document tokenized on its own, each followed by EOS."""
    return [t for doc in docs for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]


def build(tmp_path, tokenizer, spec):
    return prepare(parse_spec(spec), tokenizer, tmp_path / "cache", builder=True)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "folder", "glob", "saved"])
def test_store_holds_the_straight_tokenization(tmp_path, tokenizer, kind):
    import datasets

    if kind == "txt":
        (tmp_path / "c.txt").write_text("\n\n".join(DOCS))
        spec = tmp_path / "c.txt"
    elif kind == "jsonl":
        (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
        spec = tmp_path / "c.jsonl"
    elif kind == "parquet":
        datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "c.parquet"))
        spec = tmp_path / "c.parquet"
    elif kind in ("folder", "glob"):
        (tmp_path / "docs").mkdir()
        for i, doc in enumerate(DOCS):  # in a folder each text file is one document
            (tmp_path / "docs" / f"{i}.txt").write_text(doc)
        spec = tmp_path / "docs" if kind == "folder" else f"{tmp_path}/docs/*.txt"
    else:
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
        spec = tmp_path / "saved"
    store = build(tmp_path, tokenizer, str(spec))
    assert store.tokens.dtype == np.uint16  # a 49,152-token vocabulary fits
    assert store.tokens.tolist() == straight(tokenizer, DOCS)
    assert store.meta["documents"] == len(DOCS)


def test_a_build_removes_what_a_killed_build_left_beside_its_store(tmp_path, tokenizer):
    from common.outputs import HOST
    from uptrain.token_store import store_folder

    (tmp_path / "c.txt").write_text("\n\n".join(DOCS))
    folder = store_folder(tmp_path / "cache", parse_spec(str(tmp_path / "c.txt")), tokenizer)
    left = folder.parent / f".{folder.name}.partial-{HOST}-{2**22 + 1}-x1y2"  # a pid above Linux's largest: dead
    (left / "tokens.bin").parent.mkdir(parents=True)
    (left / "tokens.bin").write_bytes(b"half")
    store = build(tmp_path, tokenizer, str(tmp_path / "c.txt"))
    assert store.folder == folder and not left.exists()
    assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".")) == []


def test_store_is_built_once_and_reused(tmp_path, tokenizer):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    first = build(tmp_path, tokenizer, str(tmp_path / "c.jsonl"))
    again = build(tmp_path, tokenizer, str(tmp_path / "c.jsonl"))
    assert first.folder == again.folder and again.meta == first.meta
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")  # a changed file is a new store
    assert build(tmp_path, tokenizer, str(tmp_path / "c.jsonl")).folder != first.folder


def test_damaged_store_and_wrong_tokenizer_are_refused(tmp_path, tokenizer, tokenizer_dir):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    store = build(tmp_path, tokenizer, str(tmp_path / "c.jsonl"))
    other = load_tokenizer(tokenizer_dir)
    other.add_tokens(["<extra-token>"])  # a different tokenizer: its fingerprint differs
    with pytest.raises(UserError, match="built with another tokenizer"):
        open_store(store.folder, other)
    with pytest.raises(UserError, match="built with another tokenizer"):  # a store named as data is checked too
        prepare(parse_spec(str(store.folder)), other, tmp_path / "cache", builder=True)
    data = store.folder / "tokens.bin"
    data.write_bytes(data.read_bytes()[:-6])  # truncated
    with pytest.raises(UserError, match="damaged: tokens.bin holds"):
        open_store(store.folder, tokenizer)
    (store.folder / "meta.json").write_text("{")
    with pytest.raises(UserError, match="damaged"):
        open_store(store.folder, tokenizer)


@pytest.mark.parametrize("spec,message", [
    ("missing.txt", "data missing.txt does not exist"),
    ("./nowhere/corpus", "does not exist"),
    ("shards/*.jsonl", "matches no file"),
    ("org/some-dataset", "Hugging Face Hub cannot be reached"),
])
def test_bad_data_specs_are_one_line(tmp_path, tokenizer, monkeypatch, spec, message):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    with pytest.raises(UserError, match=message):
        build(tmp_path, tokenizer, spec)


def test_jsonl_that_is_not_utf8_is_one_line(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match="bad.jsonl"):
        build(tmp_path, tokenizer, str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "holds no text"),
    ("empty.jsonl", b"", "holds no text"),
    ("binary.txt", bytes(range(128, 256)) * 8, "is not UTF-8 text"),
    ("invalid.jsonl", b'{"text": "a"}\n{not json\n', "JSON parse error"),
    ("invalid.csv", b'text,b\n1,2,3\n"x\n', "cannot read data"),
])
def test_bad_data_files_say_why_and_leave_no_lock(tmp_path, tokenizer, capsys, name, content, message):
    """Not datasets' "An error occurred while generating the dataset", and no zero-byte lock beside the stores."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as refused:
        build(tmp_path, tokenizer, str(tmp_path / name))
    assert "generating the dataset" not in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "cache").exists()  # no store, no .lock, not even the folder made for them
    assert capsys.readouterr().err == ""  # datasets' own logging of the reason is kept quiet


def test_data_mappings_and_mixtures_parse():
    specs = parse_specs([{"path": "web.jsonl", "weight": 0.7}, {"path": "org/code", "name": "python", "weight": "0.3"}])
    assert [(s.path, s.weight, s.name) for s in specs] == [("web.jsonl", 0.7, None), ("org/code", 0.3, "python")]
    assert parse_spec("org/name:validation").split == "validation"
    with pytest.raises(UserError, match="unknown data key 'wieght'"):
        parse_spec({"path": "a.txt", "wieght": 1})
    with pytest.raises(UserError, match="weight must be a positive number"):
        parse_spec({"path": "a.txt", "weight": 0})
    assert load_recipe(None, ["data=[{path: a.txt, weight: 2}, {path: b.txt}]"]).data[0]["weight"] == 2


def test_permutation_is_a_bijection_for_any_size():
    for n in (1, 2, 3, 5, 64, 1000, 4099):
        assert sorted(permute(np.arange(n), n, key=7).tolist()) == list(range(n))
    assert permute(np.arange(1000), 1000, 1).tolist() != permute(np.arange(1000), 1000, 2).tolist()


def test_webster_apportionment_never_takes_back():
    previous = [0, 0, 0]
    for total in range(500):
        seats = apportion([0.7, 0.2, 0.1], total)
        assert sum(seats) == total and all(a >= b for a, b in zip(seats, previous))
        assert all(abs(s - total * w) <= 1 for s, w in zip(seats, [0.7, 0.2, 0.1]))
        previous = seats


def all_sequences(sampler, steps, grad_accum, world):
    return [[slot for micro in range(grad_accum) for rank in range(world)
             for slot in sampler.micro_batch_at(step, micro, rank)] for step in range(steps)]


def test_a_step_holds_the_same_sequences_whatever_the_world_size():
    one = all_sequences(StepSampler([50], [1.0], 4, 1, 1, seed=3), 30, 1, 1)
    two = all_sequences(StepSampler([50], [1.0], 2, 1, 2, seed=3), 30, 1, 2)
    four = all_sequences(StepSampler([50], [1.0], 1, 2, 2, seed=3), 30, 2, 2)
    assert one == two == four
    # a fresh sampler (a resumed run) gives the same step; each epoch visits every sequence once
    assert all_sequences(StepSampler([50], [1.0], 4, 1, 1, seed=3), 30, 1, 1)[17] == one[17]
    flat = [i for step in one for _, i in step]
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50)) and flat[:50] != flat[50:100]


def test_mixture_shares_follow_the_weights_at_every_step():
    sampler = StepSampler([40, 1000], [0.25, 0.75], 4, 1, 1, seed=0)
    counts = [0, 0]
    for step in range(200):
        for source, index in sampler.step_slots(step):
            counts[source] += 1
            assert index < sampler.sizes[source]
        total = (step + 1) * 4
        assert abs(counts[0] - 0.25 * total) <= 1


def test_a_stream_is_read_only_as_far_as_the_cap(tmp_path, tokenizer):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    spec = parse_spec({"path": str(tmp_path / "c.jsonl"), "streaming": True})
    whole = straight(tokenizer, DOCS)
    assert prepare(spec, tokenizer, tmp_path / "cache", builder=True).tokens.tolist() == whole
    capped = prepare(spec, tokenizer, tmp_path / "cache", builder=True, max_tokens=20)
    assert capped.tokens.tolist() == whole[:20]


def test_held_out_text_that_is_not_utf8_is_one_line(tmp_path):
    from common.data import read_text

    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match="bad.jsonl is not UTF-8 text"):
        read_text(tmp_path / "bad.jsonl")
