"""What a study scores and how (see [`echogen_rl.experiments.study`]): its seed sets and layouts, and the per-layout
scores of one trained run, written to `study_scores_<split>.json` in the run's folder."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from echogen_rl.data.shapes import ShapesConfig, build_shapes_dataset, detect_from_codes
from echogen_rl.data.splits import SEED_SETS, VALIDATION_SEED
from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.inference import generate_images
from echogen_rl.eval.metrics import (
    color_accuracy,
    cycle_iou_per_image,
    grounding_accuracy,
    mask_iou_per_image,
    strict_recall50,
)
from echogen_rl.eval.reward_check import DRAWINGS, reward_check
from echogen_rl.layout import Layout
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.loading import load_trained
from echogen_rl.models.prompts import PromptBuilder

MODES = {"": 1.0, "_greedy": 0.0}  # metric suffix -> sampling temperature
# Layouts generated and grounded together when scoring: decoding steps cost mostly per-call overhead at this size
# (`benchmarks/scoring_batch.py`: 1.15x faster generation and 1.07x faster grounding than 64, the same greedy codes and
# groundings; T=1 samples depend on the batch size, see `generate_images`).
SCORING_BATCH = 256


def color_per_layout(codes: torch.Tensor, targets: Sequence[Layout], config: ShapesConfig) -> list[float | None]:
    """Per layout, the share of entities whose box's dominant color is the phrase's (see `color_accuracy`)."""
    return [color_accuracy(codes[i : i + 1], [t], config) for i, t in enumerate(targets)]


def score_codes(codes, targets, policy_grounder, reference_grounder, config: ShapesConfig) -> dict:
    """Per-layout scores of generated images, and their oracle detections (for AP).

    - `cycle_miou_ref`: mean IoU of the layout's boxes with those a fixed grounder (PMTP's) recovers from the image;
      `cycle_miou_policy`: the same with the scored model's own grounder.
    - `tolerant_l2i`: [`mask_iou_per_image`]; `strict50`: [`strict_recall50`]; `color`: the dominant color per box.
    """
    phrases = [t.phrases for t in targets]
    detections = [detect_from_codes(row, config) for row in codes.tolist()]
    reference = cycle_iou_per_image([g.layout for g in reference_grounder(codes, phrases)], targets)
    if policy_grounder.model is reference_grounder.model:  # the reference scored as an arm: the same grounding
        policy = reference
    else:
        policy = cycle_iou_per_image([g.layout for g in policy_grounder(codes, phrases)], targets)
    return {
        "scores": {
            "cycle_miou_ref": reference,
            "cycle_miou_policy": policy,
            "tolerant_l2i": mask_iou_per_image(codes, targets, config),
            "strict50": strict_recall50(detections, targets),
            "color": color_per_layout(codes, targets, config),
        },
        "detections": [d.to_dict() for d in detections],
    }


def evaluate_model(model, tokenizer, reference, targets, real_codes, config: ShapesConfig) -> dict:
    """Scores one model per layout in both sampling modes, plus its grounding of the real images."""
    prompts = PromptBuilder(tokenizer, real_codes.shape[1])
    policy_grounder = Grounder(model, prompts, SCORING_BATCH)
    reference_grounder = Grounder(reference, prompts, SCORING_BATCH)
    result = {}
    for suffix, temperature in MODES.items():
        codes = generate_images(
            model, tokenizer, targets, guidance_scale=1.0, temperature=temperature, seed=0, batch_size=SCORING_BATCH
        )
        scored = score_codes(codes, targets, policy_grounder, reference_grounder, config)
        result[suffix or "_t1"] = {**scored, "codes": codes.tolist()}
    grounded = [g.layout for g in policy_grounder(real_codes, [t.phrases for t in targets])]
    result["grounding_miou"] = cycle_iou_per_image(grounded, targets)
    result["grounding"] = grounding_accuracy(grounded, targets)
    return result


def study_layouts(
    split: str, layouts: int, config: ShapesConfig, seed_set: str = "a"
) -> tuple[list[Layout], torch.Tensor]:
    """The layouts a study scores (with their captions) and their real images' codes: the seed set's held-out
    layouts, or the validation layouts (one split for every set)."""
    seed = SEED_SETS[seed_set]["held_out_seed"] if split == "held_out" else VALIDATION_SEED
    data = build_shapes_dataset(layouts, seed=seed, config=config)
    targets = [Layout.from_json(t) for t in data["layout"]]
    for t, caption in zip(targets, data["caption"]):
        t.caption = caption
    return targets, torch.tensor(data["image_codes"])


def scores_path(path: Path, split: str) -> Path:
    return Path(path) / f"study_scores_{split}.json"


def has_scores(path: Path, split: str, layouts: int, checks_rewards: bool) -> bool:
    """Whether `path` holds scores of this split's `layouts` (a study rerun with more layouts rescores)."""
    result = _scores(path, split, layouts)
    return result is not None and (not checks_rewards or set(DRAWINGS) <= set(result.get("reward_check", {})))


def _scores(path: Path, split: str, layouts: int) -> dict | None:
    """The scores of `path` on this split's `layouts`, or `None` when there are none (or of another count)."""
    file = scores_path(path, split)
    if not file.exists():
        return None
    result = json.loads(file.read_text())
    return result if len(result.get("grounding_miou", ())) == layouts else None


def score_run(
    path: str,
    base: str | None,
    reference: str,
    split: str,
    layouts: int,
    checks_rewards: bool,
    world: dict,
    seed_set: str = "a",
) -> float:
    """Scores one trained run (a study job): [`evaluate_model`] against the `reference` grounder, plus
    [`reward_check`] for the grounders that give rewards; writes `study_scores_<split>.json`; returns seconds.
    Scores already there are kept: a run scored before a drawing joined the reward check gets only that drawing."""
    clock = time.perf_counter()
    config = ShapesConfig(**world)
    targets, real_codes = study_layouts(split, layouts, config, seed_set)
    model, tokenizer = load_trained(Path(path), Path(base) if base else None)
    result = _scores(Path(path), split, layouts)
    if result is None:
        same = Path(path).resolve() == Path(reference).resolve()
        reference_model = model if same else load_trained(Path(reference))[0]
        result = evaluate_model(model, tokenizer, reference_model, targets, real_codes, config)
    if checks_rewards:
        checked = result.setdefault("reward_check", {})
        missing = [d for d in DRAWINGS if d not in checked]
        grounder = Grounder(model, PromptBuilder(tokenizer, real_codes.shape[1]), SCORING_BATCH)
        checked.update(reward_check(grounder, targets, config, drawings=missing))
    write_report(result, scores_path(Path(path), split))
    return time.perf_counter() - clock
