"""Control rewards for studies: a reward whose values are shuffled within each batch, and one any policy climbs.

GRPO with shuffled rewards keeps everything of a run (rollouts, the loss, the optimizer, the reward's scale and
spread) except the information in the reward, so a stage that beats it gains from what the reward says, not
from the extra steps or the noise of policy-gradient updates.

    reward_funcs: [echogen_rl.rewards.controls:shuffled_cycle_iou, echogen_rl.rewards.controls:shuffled_grounding_format]

Each shuffled reward draws its permutations from its own generator seeded alike, and the trainer calls every reward
function once per batch in the same order, so all the shuffled rewards of a run are permuted together: the total
reward of a completion is another completion's total.

`background_share` asks for nothing but background: a policy climbs it by drawing less, so a run whose reward stays
flat on it is held back by its settings (learning rate, KL), not by a weak reward signal
(`benchmarks/cyclerl_learnability.py`).
"""

from __future__ import annotations

import numpy as np

from echogen_rl.rewards.cycle import cycle_iou, grounding_format


class ShuffledReward:
    """`func`'s values for a batch, permuted at random within the batch (`None` entries stay in place).

    Args:
        func (`Callable`): a reward function with TRL's signature.
        seed (`int`, *optional*, defaults to `0`): seeds the permutations.
    """

    def __init__(self, func, seed: int = 0):
        self.func, self.seed = func, seed
        self.rng = np.random.default_rng(seed)
        self.__name__ = f"shuffled_{getattr(func, '__name__', type(func).__name__)}"

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        values = list(self.func(prompts=prompts, completions=completions, **kwargs))
        slots = [i for i, v in enumerate(values) if v is not None]
        order = self.rng.permutation(len(slots))
        shuffled = list(values)
        for slot, source in zip(slots, order):
            shuffled[slot] = values[slots[source]]
        return shuffled


shuffled_cycle_iou = ShuffledReward(cycle_iou)
shuffled_grounding_format = ShuffledReward(grounding_format)


def background_share(prompts, completions, image_codes, **kwargs) -> list[float]:
    """The share of background codes (code 0) in each generated image."""
    return [sum(code == 0 for code in codes) / len(codes) for codes in image_codes]
