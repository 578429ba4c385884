"""The reward check and gate: does a cycle reward's grounder tell a drawing from a painted box, or from the same
shapes in the wrong colors?

Each grounder that gives a reward is asked for the boxes of layouts drawn five ways (correct, filled boxes, another
kind in each box, another color, empty). The study passes its gate only when the reward grounder ranks the correct
drawing clearly above the others; otherwise CycleRL's comparisons are no evidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from echogen_rl.data.kind_negatives import draw_other_colors, draw_other_kinds
from echogen_rl.data.shapes import ShapesConfig, render_codes, render_filled_boxes
from echogen_rl.eval.metrics import cycle_iou_per_image
from echogen_rl.eval.stats import bootstrap_ci, paired_difference
from echogen_rl.layout import Layout

DRAWINGS = ("correct", "filled", "other_kind", "other_color", "empty")
REWARD_GROUNDERS = ("pmtp", "djo")  # PMTP's scores `cycle_miou_ref`; each seed's DJO is its CycleRL's reference
# The reward gate: CycleRL's arms count as evidence only when its reward grounder (each seed's DJO) gives a correct
# drawing more cycle IoU than the same boxes filled with their colors, and than the same shapes in colors the layout
# does not name, by at least this much (the intervals' lower ends). Below it the reward pays a painted box, or a
# wrong color, nearly as much as a drawing, and a gain may be a blob's.
REWARD_GATE_MARGIN = 0.15


_DRAWERS = {
    "correct": render_codes,
    "filled": render_filled_boxes,
    "other_kind": draw_other_kinds,
    "other_color": draw_other_colors,
    "empty": lambda t, config: [0] * config.grid_size**2,
}


def reward_check(
    grounder, targets: Sequence[Layout], config: ShapesConfig, drawings: Sequence[str] = DRAWINGS
) -> dict[str, list[float | None]]:
    """Per layout, the cycle IoU a grounder gives drawings of it: `correct` (the shapes as the world draws them),
    `filled` (each box filled with its color, any kind: the blob a box-IoU reward must not pay for), `other_kind`
    (each entity drawn as another kind in its box, [`draw_other_kinds`]), `other_color` (each entity its own kind in
    its box, in a color the layout does not name, [`draw_other_colors`]) and `empty` (a black image). The cycle
    reward sees shape only if `correct` scores above `filled` and `other_kind`, and color only if it scores above
    `other_color`. A square's or a rectangle's filled box is its own drawing, so `correct - filled` is at most the
    share of round kinds. `drawings` names the ones to score (all by default)."""
    unknown = set(drawings) - set(DRAWINGS)
    if unknown:
        raise ValueError(f"reward_check: unknown drawings {sorted(unknown)}; known: {DRAWINGS}")
    phrases = [t.phrases for t in targets]
    out = {}
    for name in drawings:
        codes = torch.tensor([_DRAWERS[name](t, config) for t in targets])
        out[name] = cycle_iou_per_image([g.layout for g in grounder(codes, phrases)], targets)
    return out


def summarize_reward_check(evals: dict[str, list[dict]], n_resamples: int) -> dict:
    """For each grounder that scores rewards (PMTP's, fixed for `cycle_miou_ref`; each seed's DJO, CycleRL's
    reference): the mean cycle IoU of each drawing, and `correct` minus each other drawing with intervals."""
    out = {}
    for arm in REWARD_GROUNDERS:
        checks = [e["reward_check"] for e in evals.get(arm, []) if "reward_check" in e]
        if not checks:
            continue
        drawn = [d for d in DRAWINGS if all(d in c for c in checks)]  # scores of an older study lack other_kind
        rows = {d: np.array([[math.nan if v is None else v for v in c[d]] for c in checks]) for d in drawn}
        out[arm] = {d: bootstrap_ci(rows[d], n_resamples) for d in drawn}
        for d in drawn[1:]:
            out[arm][f"correct_minus_{d}"] = paired_difference(rows["correct"], rows[d], n_resamples=n_resamples)
    return out


def reward_gate(check: dict, margin: float = REWARD_GATE_MARGIN) -> dict:
    """Whether the reward grounder sees shape and color: `correct - filled` and `correct - other_color` with their
    intervals' lower ends at least `margin`, and `correct` above `other_kind` and `empty` (lower ends above 0).
    `check` is one grounder's entry of [`summarize_reward_check`]; a missing entry fails."""

    def low(name):
        return check.get(name, {}).get("ci_low", -math.inf)

    if not check:
        return {
            "margin": margin,
            "passed": False,
            "reasons": ["no reward check of the reward grounder: it was not scored"],
        }
    reasons = []
    for d in ("filled", "other_color"):
        if low(f"correct_minus_{d}") < margin:
            reasons.append(f"correct - {d}: interval's lower end {low(f'correct_minus_{d}'):.3f} < {margin}")
    for d in ("other_kind", "empty"):
        if low(f"correct_minus_{d}") <= 0:
            reasons.append(f"correct - {d}: interval's lower end {low(f'correct_minus_{d}'):.3f} <= 0")
    return {"margin": margin, "passed": not reasons, "reasons": reasons}
