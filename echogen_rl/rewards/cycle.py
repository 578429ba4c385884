"""Built-in cycle rewards: how well the in-model grounder recovers the input layout from the generated image.

Every function has TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]` and reads the
kwargs the CycleRL trainer adds: `target_layouts` and `recovered_layouts` (one `Layout` each per
completion), `grounding_problems` (a list of strings each) and `image_codes`. Entities are matched by
phrase and order, then by Hungarian assignment on IoU (`echogen_rl.layout.match_layouts`); a target
entity the grounder did not recover scores `missing` (0 by default). A target with no entities gives
`None`: the reward does not apply.
"""

from __future__ import annotations

from echogen_rl.layout import Layout, center_distance, giou, iou, l1_distance, matched_box_scores

_SQRT2 = 2**0.5


def _l1(a, b):
    # Mean absolute coordinate error in [0, 1]; as a reward, 1 is a perfect box.
    return 1.0 - l1_distance(a, b)


def _center(a, b):
    # Center distance over the image diagonal; as a reward, 1 is a perfect center.
    return 1.0 - center_distance(a, b) / _SQRT2


METRICS = {"iou": iou, "giou": giou, "l1": _l1, "center": _center}


def layout_agreement(target: Layout, recovered: Layout, metric: str = "iou", missing: float = 0.0) -> float | None:
    """`(1/K) * sum_k d(recovered_k, target_k)` over the K target entities; `None` for an empty target."""
    if not target.entities:
        return None
    scores = matched_box_scores(recovered, target, METRICS[metric], missing)
    return sum(scores) / len(scores)


class CycleReward:
    """A picklable cycle reward with a `__name__`, as TRL names its metrics after it.

    Args:
        metric (`str`, *optional*, defaults to `"iou"`): `"iou"`, `"giou"`, `"l1"` (1 - mean |coordinate error|)
            or `"center"` (1 - center distance / image diagonal).
        missing (`float`, *optional*, defaults to `0.0`): the score of a target entity with no recovered box.
    """

    def __init__(self, metric: str = "iou", missing: float = 0.0):
        if metric not in METRICS:
            raise ValueError(f"CycleReward: metric must be one of {sorted(METRICS)}, got {metric!r}")
        self.metric, self.missing = metric, missing
        self.__name__ = f"cycle_{metric}"

    def __call__(self, prompts, completions, target_layouts, recovered_layouts, **kwargs) -> list[float | None]:
        return [layout_agreement(t, r, self.metric, self.missing) for t, r in zip(target_layouts, recovered_layouts)]


def get_cycle_reward(metric: str = "iou", missing: float = 0.0) -> CycleReward:
    """Factory of parameterized cycle rewards (see `CycleReward`)."""
    return CycleReward(metric, missing)


cycle_iou = CycleReward("iou")
cycle_giou = CycleReward("giou")
cycle_l1 = CycleReward("l1")
cycle_center = CycleReward("center")


def grounding_format(prompts, completions, grounding_problems, **kwargs) -> list[float]:
    """1.0 when the grounder's answer parsed cleanly with a box for every queried phrase, else 0.0."""
    return [0.0 if problems else 1.0 for problems in grounding_problems]
