"""Config values are type-checked when the YAML is read: the error names the file, the key, the value and the type."""

from pathlib import Path

import pytest
import yaml

from echogen_rl.scripts.runner import (
    ConfigTypeError,
    check_value,
    load_recipe,
    parse_recipe_args,
    recipe_classes,
)

REPO = Path(__file__).resolve().parents[1]


def _parse(tmp_path, stage, **changes):
    values = yaml.safe_load((REPO / "recipes" / "configs" / stage / "shapes_tiny.yaml").read_text())
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({**values, **changes}))
    return config, parse_recipe_args(recipe_classes(load_recipe(stage, config)), config, [])


@pytest.mark.parametrize(
    "stage,key,value,expected",
    [
        ("pmtp", "learning_rate", "fast", "expected a number"),
        ("pmtp", "max_steps", 10.5, "expected an integer"),
        ("djo", "bf16", "yes", "expected true or false or null"),
        ("djo", "loop_weight", [1.0], "expected a number"),
        ("pmtp", "num_train_samples", "many", "expected an integer or null"),
        ("cyclerl", "reward_funcs", 5, "expected a list (items: a string)"),
        ("cyclerl", "report_to", 3, "expected null or a string or a list (items: a string)"),
        ("cyclerl", "use_peft", "no", "expected true or false"),
    ],
)
def test_a_mistyped_value_names_file_key_value_and_type(tmp_path, stage, key, value, expected):
    with pytest.raises(ConfigTypeError) as err:
        _parse(tmp_path, stage, **{key: value})
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'mine.yaml'}: key '{key}' has the value {value!r}"), message
    assert expected in message, message


def test_values_that_fit_are_kept_and_yaml_exponents_become_floats(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; a float field takes it as the number it means.
    _, (script, training, model) = _parse(tmp_path, "pmtp", learning_rate="1e-4", report_to="none")
    assert training.learning_rate == 1e-4 and training.report_to == []
    _, (_, training, _) = _parse(tmp_path, "cyclerl", reward_funcs="cycle_iou", lora_target_modules=["q_proj"])
    assert training.reward_funcs == ["cycle_iou"]


def test_check_value_follows_the_type():
    assert check_value(3, float) == 3.0 and isinstance(check_value(3, float), float)
    assert check_value(None, int | None) is None
    with pytest.raises(TypeError):
        check_value(True, int)  # a bool is not a count
    with pytest.raises(TypeError):
        check_value("inf-ish", float)
    assert check_value({"a": 1}, dict[str, int] | str) == {"a": 1}


def test_cyclerl_prompt_data_are_script_arguments_checked_by_name(tmp_path):
    _, (script, training, _) = _parse(
        tmp_path, "cyclerl", prompt_source="random", num_random_prompts=5, random_box_grid=8, random_max_entities=2
    )
    assert (script.prompt_source, script.num_random_prompts) == ("random", 5)
    assert script.random_layout_kwargs()["grid_size"] == 8 and script.random_layout_kwargs()["max_entities"] == 2
    # The trainer's config holds no data field: it never read them.
    assert not [name for name in vars(training) if name.startswith("random_") or name == "prompt_source"]
    for changes, culprit in (
        ({"prompt_source": "web"}, "prompt_source"),
        ({"random_min_entities": 3, "random_max_entities": 2}, "random_min_entities"),
        ({"random_max_box_size": 1.5}, "random_min_box_size / random_max_box_size"),
        ({"num_random_prompts": 0}, "num_random_prompts"),
    ):
        with pytest.raises(ValueError, match=culprit):
            _parse(tmp_path, "cyclerl", **changes)
