"""`run.py demo` end to end on a tiny model of your own (`--source`): every stage, the report, the
answers, the plot. tests/e2e/test_demo_smollm2.py runs it on the embedded SmolLM2-135M."""
import dataclasses
import json

import yaml

import convert
import demo
from uptrain.recipe import Recipe


def test_demo_runs_the_whole_pipeline_on_a_users_model(cli, make_source, tmp_path, capsys):
    source, out = make_source(layers=4), tmp_path / "demo"
    assert cli("demo", "--source", source, "--init", "copy", "--steps", 2, "--max-tokens", 300, "--new-tokens", 4,
               "--out", out) == 0
    report = json.loads((out / "reports" / "fusedkv-copy" / "demo.json").read_text())
    assert set(report["models"]) == {"source", "candidate", "control"}
    assert [t["name"] for t in report["texts"]] == ["wikitext-2/test", "ood/python-docs"]
    models = report["models"]
    assert models["candidate"]["kv_bytes_per_token_measured"] * 2 == models["source"]["kv_bytes_per_token_measured"]
    answers = report["answers"]
    names = ["source", "control (2 steps)", "fusedkv step 0", "fusedkv after 2 steps"]
    assert list(answers) == ["prompts", *names]
    assert all(len(answers[name]) == len(answers["prompts"]) == 3 for name in names)
    assert set(report["step0_perplexity"]) == {"wikitext-2/test", "ood/python-docs"}
    control_curve = [json.loads(line) for line in (out / "runs" / "source-control" / "metrics.jsonl").open()]
    assert control_curve[0] == {"step": 0, "tokens": 0, "eval_ppl": control_curve[0]["eval_ppl"]}  # the plot's step 0
    assert [r["step"] for r in control_curve if "eval_ppl" in r] == [0, 1, 2]
    control_config = json.loads((out / "runs" / "source-control" / "final" / "config.json").read_text())
    assert control_config["num_hidden_layers"] == 4  # the control arm trained the user's source
    assert (out / "quality_per_compute.png").is_file()
    err = capsys.readouterr().err
    assert "nowhere near parity" in err and "greedy answers" in err
    # every stage is shown as the command a user would type, each with the user's source
    commands = [line for line in err.splitlines() if line.startswith("$ python run.py ")]
    assert [command.split()[3] for command in commands] == ["uptrain", "convert", "uptrain", "validate"]
    assert all(f"--source {source}" in command for command in commands)
    assert "--control-arm" in commands[0] and "--init copy" in commands[1]
    assert f"({source.name}, 2 uptraining steps" in err
    assert "uptrain: peak memory" in err and set(report["peak_memory_gb"]) == {"uptrain", "convert", "validate"}

    # a second run finds the conversion and both runs, and only judges again
    assert cli("demo", "--source", source, "--init", "copy", "--steps", 2, "--max-tokens", 300, "--new-tokens", 4,
               "--out", out) == 0
    again = [line.split()[3] for line in capsys.readouterr().err.splitlines() if line.startswith("$ python run.py ")]
    assert again == ["validate"]
    # ... and what another source or budget would need is never taken from an earlier run
    conversion = convert.ConvertOptions(source=str(source), layout="fusedkv", init="copy", **demo.DEMO_FIT)
    assert demo.converted_with(out / "checkpoints" / "fusedkv-copy", conversion)
    assert not demo.converted_with(out / "checkpoints" / "fusedkv-copy", dataclasses.replace(conversion, source=None))
    control = out / "runs" / "source-control"
    recipe = Recipe(**yaml.safe_load((control / "recipe.yaml").read_text()))
    assert demo.started_with(control, recipe)
    assert not demo.started_with(control, dataclasses.replace(recipe, budget={"steps": 3}))
