"""What CycleRL's advantage says about the image: within a group of images for one layout, does the reward rank the
images as the oracle does? From a validation study's seed-0 DJO, the model CycleRL starts from and grounds with.

    python benchmarks/cyclerl_signal.py --from-study outputs/val \
        --out benchmarks/results/study_6shapes_validation/cyclerl_signal.json

For `--layouts` validation layouts (never the held-out ones), draws `--group` images per layout at T=1, as CycleRL's
rollouts are drawn, and reads each image twice: by CycleRL's reward (the cycle IoU that the DJO grounder's boxes
have with the layout) and by the shapes world's oracle (`strict50`: the share of the layout's shapes drawn with their
color and kind at IoU >= 0.5; `tolerant_l2i`). GRPO learns only from the reward's differences within a group, so the
check is the within-group correlation: both scores minus their group's mean, pooled over the groups; also with
`readable` (1 where the grounder's answer has no problem). Also writes the reward of greedy images (the oracle's
scores rise most there) and the share of images whose grounding has a problem (a phrase named wrongly, a box
missing), on the generated and on the real images.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from common import write_json

from echogen_rl.data.shapes import ShapesConfig, detect_from_codes
from echogen_rl.eval.inference import generate_images
from echogen_rl.eval.metrics import cycle_iou_per_image, mask_iou_per_image, strict_recall50
from echogen_rl.experiments.study_scoring import SCORING_BATCH, study_layouts
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.loading import load_trained
from echogen_rl.models.prompts import PromptBuilder


def within_group_correlation(reward: np.ndarray, score: np.ndarray) -> dict:
    """`reward` and `score` of shape [layouts, group]: the Pearson correlation of their deviations from each group's
    mean, pooled over the groups where both vary (elsewhere GRPO's advantage is 0 or the score says nothing)."""
    keep = (reward.std(1) > 0) & (score.std(1) > 0)
    r = reward[keep] - reward[keep].mean(1, keepdims=True)
    s = score[keep] - score[keep].mean(1, keepdims=True)
    correlation = float((r * s).sum() / np.sqrt((r * r).sum() * (s * s).sum())) if keep.any() else float("nan")
    return {"correlation": correlation, "groups": int(keep.sum()), "of": int(len(keep))}


def read(grounder, codes: torch.Tensor, targets, config: ShapesConfig) -> dict[str, list]:
    """Each image's reward (cycle IoU by `grounder`), oracle scores and whether its grounding has a problem."""
    grounded = grounder(codes, [t.phrases for t in targets])
    detections = [detect_from_codes(row, config) for row in codes.tolist()]
    return {
        "reward": cycle_iou_per_image([g.layout for g in grounded], targets),
        "strict50": strict_recall50(detections, targets),
        "tolerant_l2i": mask_iou_per_image(codes, targets, config),
        "problem": [bool(g.problems) for g in grounded],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-study", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0, help="the study seed whose DJO run is read")
    parser.add_argument("--layouts", type=int, default=128)
    parser.add_argument("--group", type=int, default=8, help="images per layout, as CycleRL's num_generations")
    parser.add_argument("--out", help="the JSON file to write")
    args = parser.parse_args()
    report = args.from_study / "study_validation.json"
    if not report.exists():  # the signal is read on validation layouts only
        raise FileNotFoundError(f"{report} is missing: use a validation study")
    world = ShapesConfig(**json.loads(report.read_text())["world"])
    targets, real_codes = study_layouts("validation", args.layouts, world)
    model, tokenizer = load_trained(args.from_study / f"seed{args.seed}" / "djo")
    grounder = Grounder(model, PromptBuilder(tokenizer, real_codes.shape[1]), SCORING_BATCH)
    repeated = [t for t in targets for _ in range(args.group)]
    sampled = generate_images(model, tokenizer, repeated, 1.0, temperature=1.0, seed=0, batch_size=SCORING_BATCH)
    greedy = generate_images(model, tokenizer, targets, 1.0, temperature=0.0, seed=0, batch_size=SCORING_BATCH)
    reads = {
        "sampled": read(grounder, sampled, repeated, world),
        "greedy": read(grounder, greedy, targets, world),
        "real": read(grounder, real_codes, targets, world),
    }

    def grid(name: str) -> np.ndarray:
        values = [np.nan if v is None else v for v in reads["sampled"][name]]
        return np.asarray(values, dtype=float).reshape(args.layouts, args.group)

    scores = {"strict50": grid("strict50"), "tolerant_l2i": grid("tolerant_l2i"), "readable": 1.0 - grid("problem")}

    reward = grid("reward")
    means = {
        source: {
            name: statistics.fmean(v for v in values if v is not None)
            for name, values in scores.items()
            if any(v is not None for v in values)
        }
        for source, scores in reads.items()
    }
    result = {
        "from_study": args.from_study.as_posix(),
        "model": f"seed{args.seed}/djo",
        "layouts": args.layouts,
        "group": args.group,
        "within_group": {name: within_group_correlation(reward, score) for name, score in scores.items()},
        "reward_std_within_group": float(reward.std(1).mean()),
        "means": means,
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
