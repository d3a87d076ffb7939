"""The README's main command, end to end on the embedded SmolLM2-135M with a tiny budget."""
import json


def test_demo_runs_the_whole_pipeline(cli, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli("demo", "--steps", 1, "--max-tokens", 300, "--out", out) == 0
    report = json.loads((out / "reports" / "fusedkv-copy" / "demo.json").read_text())
    assert set(report["models"]) == {"source", "candidate", "control"}
    assert [t["name"] for t in report["texts"]] == ["wikitext-2/test", "ood/python-docs"]
    models = report["models"]
    assert models["candidate"]["kv_bytes_per_token_measured"] * 2 == models["source"]["kv_bytes_per_token_measured"]
    for text in report["texts"]:
        # step 0 of a correct conversion is far worse than the source; one step of training already helps
        assert report["step0_perplexity"][text["name"]] > 50 * text["perplexity"]["source"]
    assert (out / "runs" / "source-control" / "final" / "config.json").is_file()
    assert "nowhere near parity" in capsys.readouterr().err
