"""Running a stage's recipe in-process, as `accelerate launch recipes/<stage>.py --config <yaml> [--field value]`.

The dry run and the study use it: a config and overrides go through the recipe's own parser and `main`, so they
run exactly what a user's launch would, and a bad YAML fails as the recipe would.
"""

from __future__ import annotations

import enum
import importlib
import sys
import types
import typing
from pathlib import Path

from transformers import Trainer, TrainerCallback
from trl import TrlParser

STAGES = ("pmtp", "djo", "cyclerl")


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
    return RecipeParser(classes).parse_args_and_config(["--config", str(config), *args])


def load_recipe(stage: str, config: Path | None = None):
    """The stage's script module, [`echogen_rl.scripts`]`.<stage>` (`recipes/<stage>.py` only calls its `main`)."""
    if stage not in STAGES:
        raise ValueError(f"no stage {stage!r}: one of {', '.join(STAGES)}")
    return importlib.import_module(f"echogen_rl.scripts.{stage}")


def recipe_classes(recipe) -> tuple:
    """The dataclasses of the recipe's `main`: `(script_args, training_args, model_args)`."""
    hints = typing.get_type_hints(recipe.main)
    return tuple(hints[name] for name in ("script_args", "training_args", "model_args"))


def run_recipe(
    stage: str, config: str | Path, overrides: dict | None = None, callbacks: typing.Sequence[TrainerCallback] = ()
) -> Trainer:
    """Runs the stage's `main` on `config` with `overrides` (`{field: value}`), as `accelerate launch
    recipes/<stage>.py` would, and returns its trainer; `callbacks` are added to the trainer it builds."""
    config = Path(config)
    recipe = load_recipe(stage, config)
    args = parse_recipe_args(recipe_classes(recipe), config, as_cli(overrides or {}))
    return recipe.main(*args, callbacks=list(callbacks))


class ConfigTypeError(ValueError):
    """A config value of the wrong type; the message names the file, the key, the value and the expected type."""


class RecipeParser(TrlParser):
    """`TrlParser` that type-checks the YAML config's values against the recipe's dataclasses when it reads them.

    `TrlParser` hands YAML values to the dataclasses as they are, so a mistyped value (`learning_rate: fast`,
    `max_steps: 10.5`) used to fail late, far from the key, or not at all. Here each value must fit its field's type
    (an int is a float; a string a float field can parse, such as YAML's `1e-4`, becomes that float; a single value
    stands for a one-item list); otherwise a [`ConfigTypeError`] names the file, the key, the value and the type.
    """

    def parse_args_and_config(self, args=None, **kwargs):
        args = list(args) if args is not None else None
        source = args if args is not None else sys.argv[1:]
        self._config_path = source[source.index("--config") + 1] if "--config" in source[:-1] else "the config"
        return super().parse_args_and_config(args, **kwargs)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        hints = {}
        for dataclass_type in self.dataclass_types:
            hints.update(typing.get_type_hints(dataclass_type))
        checked = {}
        for key, value in kwargs.items():
            checked[key] = value
            if key in hints:
                try:
                    checked[key] = check_value(value, hints[key])
                except TypeError as err:
                    raise ConfigTypeError(
                        f"{getattr(self, '_config_path', 'the config')}: key '{key}' has the value {value!r} "
                        f"({type(value).__name__}), expected {err}"
                    ) from None
        return super().set_defaults_with_config(**checked)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list (items: {_type_name(args[0])})" if args else "a list"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    if hint is dict or origin is dict:
        return "a mapping"
    return _SCALAR_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


_SCALAR_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_value(value, hint):
    """`value` if it fits the type `hint` (converted where noted in [`RecipeParser`]); a `TypeError` whose message
    is the expected type otherwise. Types it cannot judge pass."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return check_value(value, option)
            except TypeError:
                continue
        raise TypeError(_type_name(hint))
    if hint is type(None):
        if value is None:
            return value
        raise TypeError("null")
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return value
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise TypeError(_type_name(hint))
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (typing.Any,)
        try:
            # A single value stands for a one-item list, as on the command line.
            return [check_value(v, item) for v in (value if isinstance(value, (list, tuple)) else [value])]
        except TypeError:
            raise TypeError(_type_name(hint)) from None
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise TypeError(_type_name(dict))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(_type_name(bool))
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(_type_name(int))
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(_type_name(float))
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError(_type_name(str))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if value in {m.value for m in hint} or isinstance(value, hint):
            return value
        raise TypeError(_type_name(hint))
    return value
