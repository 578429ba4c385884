"""Running a stage's recipe in-process, as `accelerate launch recipes/<stage>.py --config <yaml> [--field value]`.

The dry run and the study use it: a config and overrides go through the recipe's own parser and `main`, so they
run exactly what a user's launch would, and a bad YAML fails as the recipe would.
"""

from __future__ import annotations

import importlib.util
import typing
from pathlib import Path

from transformers import Trainer
from trl import TrlParser

REPO = Path(__file__).resolve().parents[1]


def as_cli(settings: dict) -> list[str]:
    """`{field: value}` as recipe command-line arguments: `--field value`, booleans as `true`/`false`, a list as
    `--field a b`."""
    args = []
    for key, value in settings.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        args += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return args


def parse_recipe_args(classes: tuple, config: Path, args: list[str]) -> tuple:
    """As the recipe's `__main__`: `TrlParser` on its dataclasses, the YAML plus command-line overrides."""
    return TrlParser(classes).parse_args_and_config(["--config", str(config), *args])


def load_recipe(stage: str, config: Path):
    """The recipe module, imported by path (recipes are not a package), found beside the repo or the config."""
    candidates = [REPO / "recipes" / f"{stage}.py", Path(config).resolve().parent.parent.parent / f"{stage}.py"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no recipe {stage}.py in {', '.join(str(p.parent) for p in candidates)}")
    spec = importlib.util.spec_from_file_location(f"echogen_rl_recipe_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_classes(recipe) -> tuple:
    """The dataclasses of the recipe's `main`: `(script_args, training_args, model_args)`."""
    hints = typing.get_type_hints(recipe.main)
    return tuple(hints[name] for name in ("script_args", "training_args", "model_args"))


def trainer_name(recipe) -> str:
    """The name under which the recipe module holds its trainer class."""
    return next(k for k, v in vars(recipe).items() if isinstance(v, type) and issubclass(v, Trainer))


def run_settings(output_dir, seed: int = 0) -> dict:
    """What a run inside a demo or a study changes besides its budget: where it writes, its seed, and no
    intermediate saving, evaluation or reporting."""
    return {
        "output_dir": str(output_dir),
        "seed": seed,
        "save_strategy": "no",
        "eval_strategy": "no",
        "num_eval_samples": 0,
        "report_to": "none",
    }


def run_recipe(stage: str, config: str | Path, overrides: dict | None = None) -> Trainer:
    """Runs `recipes/<stage>.py` on `config` with `overrides` (`{field: value}`) and returns its trainer."""
    config = Path(config)
    recipe = load_recipe(stage, config)
    name = trainer_name(recipe)
    ran = []

    class Recorded(getattr(recipe, name)):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ran.append(self)

    Recorded.__name__ = Recorded.__qualname__ = getattr(recipe, name).__name__
    setattr(recipe, name, Recorded)
    recipe.main(*parse_recipe_args(recipe_classes(recipe), config, as_cli(overrides or {})))
    return ran[-1]
