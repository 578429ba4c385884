"""Reward functions by name: built-ins from a plain dict, yours by `package.module:function` or `file.py:function`.

    reward_funcs: [cycle_iou, grounding_format, my_pkg.rewards:colorfulness, rewards/my_reward.py:area]
    reward_weights: [1.0, 0.1, 0.5, 0.2]

Every function is wrapped so that an exception or a NaN says which function it came from.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from echogen_rl.rewards.cycle import cycle_center, cycle_giou, cycle_iou, cycle_l1, grounding_format

REWARDS: dict[str, Callable] = {
    "cycle_iou": cycle_iou,
    "cycle_giou": cycle_giou,
    "cycle_l1": cycle_l1,
    "cycle_center": cycle_center,
    "grounding_format": grounding_format,
}


class RewardError(RuntimeError):
    """A reward function failed; the message names it."""


class NamedReward:
    """Calls a reward function and names it in every failure (exception, non-list result, NaN).

    `None` entries pass through: TRL treats them as "does not apply". Picklable when the function is.
    """

    def __init__(self, func: Callable, name: str | None = None):
        self.func = func
        self.__name__ = name or getattr(func, "__name__", type(func).__name__)

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        try:
            out = self.func(prompts=prompts, completions=completions, **kwargs)
        except Exception as err:
            raise RewardError(f"reward function {self.__name__!r} raised {type(err).__name__}: {err}") from err
        if not isinstance(out, (list, tuple)):
            raise RewardError(f"reward function {self.__name__!r} returned {type(out).__name__}, expected a list")
        for i, value in enumerate(out):
            if value is not None and isinstance(value, float) and math.isnan(value):
                raise RewardError(
                    f"reward function {self.__name__!r} returned NaN for completion {i}; return None where a "
                    "reward does not apply"
                )
        return list(out)


def load_reward(spec: str | Callable) -> NamedReward:
    """One reward function from a built-in name, `package.module:function`, `path/to/file.py:function` or a callable."""
    if callable(spec):
        return NamedReward(spec)
    if spec in REWARDS:
        return NamedReward(REWARDS[spec], spec)
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}: built-ins are {sorted(REWARDS)}; or use module:function")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"echogen_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ValueError(f"reward {spec!r}: cannot import {where}: {err}") from err
    func = getattr(module, name, None)
    if not callable(func):
        raise ValueError(f"reward {spec!r}: {where} has no function {name!r}")
    return NamedReward(func, name)


def load_rewards(specs: Sequence[str | Callable]) -> list[NamedReward]:
    """The reward functions for a list of specs (see `load_reward`)."""
    if not specs:
        raise ValueError("no reward functions given")
    return [load_reward(s) for s in specs]
