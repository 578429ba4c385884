"""Reward functions for CycleRL, with TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`."""

from echogen_rl.rewards.cycle import (
    CycleReward,
    cycle_center,
    cycle_giou,
    cycle_iou,
    cycle_l1,
    get_cycle_reward,
    grounding_format,
    layout_agreement,
)
from echogen_rl.rewards.registry import REWARDS, NamedReward, RewardError, load_reward, load_rewards

__all__ = [
    "REWARDS",
    "CycleReward",
    "NamedReward",
    "RewardError",
    "cycle_center",
    "cycle_giou",
    "cycle_iou",
    "cycle_l1",
    "get_cycle_reward",
    "grounding_format",
    "layout_agreement",
    "load_reward",
    "load_rewards",
]
