"""A custom CycleRL reward, plugged in without forking: list it in the YAML by file path.

    reward_funcs: [cycle_iou, rewards/custom_reward.py:box_fill]
    reward_weights: [1.0, 0.5]

A reward has TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`; name the kwargs you
need. CycleRL passes `target_layouts`, `recovered_layouts` (echogen_rl.layout.Layout), `grounding_problems`,
`image_codes` (the generated code grid, row-major) and every dataset column. Return `None` where the reward
does not apply.
"""

import math


def box_fill(prompts, completions, target_layouts, image_codes, **kwargs) -> list[float | None]:
    """Shapes world: the fraction of non-background codes inside the target boxes (does the image draw there?)."""
    rewards = []
    for layout, codes in zip(target_layouts, image_codes):
        side = math.isqrt(len(codes))
        cells = filled = 0
        for entity in layout.entities:
            x1, y1, x2, y2 = (round(v * side) for v in entity.box)
            for y in range(y1, max(y2, y1 + 1)):
                for x in range(x1, max(x2, x1 + 1)):
                    cells += 1
                    filled += codes[min(y, side - 1) * side + min(x, side - 1)] != 0
        rewards.append(filled / cells if cells else None)
    return rewards
