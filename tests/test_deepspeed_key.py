"""The recipe key deepspeed: a user's DeepSpeed JSON merged over configs/deepspeed_zero.json, the
recipe's own settings (batch sizes, ZeRO stage, precision, clipping, offload) kept, a file that
contradicts them or that DeepSpeed refuses is one line and exit 2 before any work."""
import json

import pytest

from common.errors import UserError
from uptrain.engine import TEMPLATE, ds_config
from uptrain.recipe import Recipe


def test_a_users_settings_merge_over_the_template_and_auto_takes_the_recipes(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 20000, "overlap_comm": True,
                                                      "stage": "auto"},
                                "train_batch_size": "auto", "bf16": {"enabled": "auto"}, "wall_clock_breakdown": True}))
    config = ds_config(Recipe(deepspeed=str(path), micro_batch=2, grad_accum=3, zero_stage=3, grad_clip=0.5), 2)
    template = json.loads(TEMPLATE.read_text())
    assert config["zero_optimization"] == {**template["zero_optimization"], "stage3_prefetch_bucket_size": 20000,
                                           "overlap_comm": True, "stage": 3}
    assert config["wall_clock_breakdown"] is True and config["steps_per_print"] == template["steps_per_print"]
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"],
            config["gradient_clipping"], config["bf16"]["enabled"]) == (2, 3, 12, 0.5, False)  # fp32 on a CPU


def test_without_the_key_the_config_is_the_template_filled_by_the_recipe():
    config = ds_config(Recipe(micro_batch=2, offload=True), 1)
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert "offload_optimizer" not in ds_config(Recipe(micro_batch=2), 1)["zero_optimization"]
    assert {k for k in config if k != "fp16"} == set(json.loads(TEMPLATE.read_text()))


@pytest.mark.parametrize("users,message", [
    ({"zero_optimization": {"stage": 3}}, "sets zero_optimization.stage to 3 but the recipe says 2 (zero_stage)"),
    ({"train_micro_batch_size_per_gpu": 8}, "sets train_micro_batch_size_per_gpu to 8 but the recipe says 4 (micro_batch)"),
    ({"train_batch_size": 16}, "sets train_batch_size to 16 but the recipe says 8 (micro_batch x grad_accum x 2 ranks)"),
    ({"bf16": {"enabled": True}}, "sets bf16.enabled to True but the recipe says False (precision)"),
    ({"fp16": {"enabled": True}}, "sets fp16.enabled to True but the recipe says False (precision (bf16 or fp32))"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "but the recipe says 'none' (offload)"),
    ({"optimizer": {"type": "AdamW"}}, "the recipe owns the optimizer and its schedule"),
])
def test_settings_the_recipe_owns_are_refused_when_they_differ(users, message):
    with pytest.raises(UserError, match="^recipe key deepspeed sets") as err:
        ds_config(Recipe(deepspeed=users, precision="fp32"), 2)
    assert message in str(err.value)
    same = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0}
    assert ds_config(Recipe(deepspeed=same), 2)["zero_optimization"]["stage"] == 2  # repeating the recipe is fine


@pytest.mark.parametrize("content,message", [
    (None, "cannot read the deepspeed config"),
    ("{'stage': 3}", "is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2"),
    ("[1, 2]", "must be a JSON object of DeepSpeed settings"),
    ('{"zero_optimization": {"stage3_prefetch_bucket_sze": 1}}', "DeepSpeed refuses the settings of"),
    ('{"zero_optimization": {"stage": 3}}', "sets zero_optimization.stage to 3 but the recipe says 2"),
])
def test_a_bad_deepspeed_json_is_one_line_before_any_work(recipe, cli, tmp_path, capsys, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    assert cli("uptrain", "--config", recipe(), "--set", f"deepspeed={path}") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
