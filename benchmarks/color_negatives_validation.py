"""Chooses `color_negative_prob` on the validation split: does the reward grounder learn to read color?

    python benchmarks/color_negatives_validation.py --from-study outputs/val_ms6 --out-dir outputs/colors djo 0.3
    python benchmarks/color_negatives_validation.py --from-study outputs/val_ms6 --out-dir outputs/colors \
        pmtp 0.3 --steps 1000 --learning-rate 5e-4

With `--shuffle-queries` the arm also asks its grounding queries in a shuffled order
(`shuffle_grounding_queries`), and `P` may be 0 (the shuffle alone).

`--from-study` is a finished validation study (`echogen-rl study --split validation`). Each arm is trained for each
of its seeds, in its world:

- `djo P`: the shipped DJO from the study's PMTP with `color_negative_prob: P` (its loop asks some entities in a
  color the layout does not name, answered "not present"). The control is the study's own DJO of that seed (the
  same config, start and seed, `color_negative_prob` 0), hard-linked and scored as it is.
- `pmtp_base P`: the shipped first phase of PMTP from the study's tiny checkpoint, on its first seed, with
  `color_negative_prob: P`; the control is the study's own first phase (`pmtp_base`), hard-linked.
- `pmtp P`: the study's PMTP continued for `--steps` at `--learning-rate` (the shipped second-phase config, one
  cosine cycle, no warm-up) with `color_negative_prob: P` (some grounding examples recolor one entity, or ask it in
  such a color); the control is the same continuation with 0, trained here too.

Every model is scored on the study's validation layouts (never held-out ones) as the study scores them: the reward
check (the cycle IoU its grounder gives a correct drawing, filled boxes, another kind, another color, an empty image)
with its gate, the correct drawing asked its phrases in reverse order and the correct and other-color drawings asked
one phrase per query (`QUERY_VARIANTS`: does the grounder read the phrases, or answer by reading order?), its L2I and grounding scores, and paired differences against the control with 95% bootstrap
intervals over seeds and layouts. Writes `color_negatives_validation.json` to `--out-dir`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from common import provenance
from djo_validation import _matrix, _score

from echogen_rl.data.kind_negatives import draw_other_colors
from echogen_rl.data.shapes import ShapesConfig, render_codes
from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.metrics import cycle_iou_per_image
from echogen_rl.eval.reward_check import reward_gate, summarize_reward_check
from echogen_rl.eval.stats import bootstrap_ci, paired_difference
from echogen_rl.experiments.jobs import PMTP_KINDS_CONFIG, Job, run_jobs
from echogen_rl.experiments.study import _run_settings, train_run
from echogen_rl.experiments.study_scoring import SCORING_BATCH, study_layouts
from echogen_rl.layout import Layout
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.loading import load_trained
from echogen_rl.models.prompts import PromptBuilder

METRICS = ("cycle_miou_ref", "tolerant_l2i", "strict50", "color", "grounding_miou")


QUERY_VARIANTS = ("correct_reversed_query", "correct_one_phrase", "other_color_one_phrase")


def _query_variants(run: Path, targets, config) -> dict[str, list[float | None]]:
    """Per layout, the cycle IoU the run's grounder gives drawings asked otherwise than at reward time:
    `correct_reversed_query` (the correct drawing, its phrases in reverse order) and `correct_one_phrase` /
    `other_color_one_phrase` (one query per phrase, the answers pooled). A grounder that reads the phrases scores
    the correct drawing the same however it is asked; one that answers by reading order does not."""
    cache = run / "query_variant_scores.json"
    if cache.exists():
        return json.loads(cache.read_text())
    model, tokenizer = load_trained(run)
    grounder = Grounder(model, PromptBuilder(tokenizer, config.grid_size**2), SCORING_BATCH)
    correct = [render_codes(t, config) for t in targets]
    results = grounder(torch.tensor(correct), [t.phrases[::-1] for t in targets])
    scores = {"correct_reversed_query": cycle_iou_per_image([r.layout for r in results], targets)}
    for name, drawn in (("correct", correct), ("other_color", [draw_other_colors(t, config) for t in targets])):
        owners = [i for i, t in enumerate(targets) for _ in t.phrases]
        answers = grounder(torch.tensor([drawn[i] for i in owners]), [[p] for t in targets for p in t.phrases])
        found: list[list] = [[] for _ in targets]
        for i, answer in zip(owners, answers):
            found[i].extend(answer.layout.entities)
        scores[f"{name}_one_phrase"] = cycle_iou_per_image([Layout(f) for f in found], targets)
    cache.write_text(json.dumps(scores) + "\n")
    return scores


def _check_matrix(results: list[dict], drawing: str) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in r["reward_check"][drawing]] for r in results])


def _study_world(study: Path) -> tuple[dict, list[int], int]:
    """The study's world (as run settings and as `ShapesConfig` fields), its seeds and its validation layouts."""
    report = json.loads((study / "study_validation.json").read_text())
    settings = report["settings"]["pmtp"]
    world = {k: v for k, v in settings.items() if k.startswith("shapes_")}
    first = report["seed_set"]["first_seed"]
    return world, [first + i for i in range(report["budget"]["seeds"])], report["layouts"]


def _stem(args) -> str:
    """The arms' folder stem: the stage, and for a PMTP continuation its steps (each length has its own control)."""
    return f"pmtp{args.steps}" if args.stage == "pmtp" else args.stage


def _plan(args, world: dict, seeds: list[int]) -> tuple[list[Job], dict[str, list[Path]]]:
    """The training jobs, and each arm's run folders (one per seed) under `--out-dir`."""
    jobs, arms = [], {}
    stage, config, start = {
        "djo": ("djo", "djo", "pmtp"),
        "pmtp": ("pmtp", PMTP_KINDS_CONFIG, "pmtp"),
        "pmtp_base": ("pmtp", "pmtp", "tiny-janus"),
    }[args.stage]
    shuffled = "_shuffled" if args.shuffle_queries else ""
    values = [(0.0, ""), (args.prob, shuffled)] if args.stage == "pmtp" else [(args.prob, shuffled)]
    for i, seed in enumerate(seeds):
        if args.stage != "pmtp":  # the control is the study's own run of this seed (its one first phase)
            control = args.out_dir / f"seed{i}" / f"{args.stage}_color0"
            if not control.exists():
                control.mkdir(parents=True)
                source = args.from_study / (f"seed{i}/djo" if args.stage == "djo" else "pmtp_base")
                for f in source.iterdir():
                    if f.is_file():
                        os.link(f, control / f.name)
            arms.setdefault(f"{args.stage}_color0", []).append(control)
        for p, suffix in values:
            name = f"{_stem(args)}_color{p:g}{suffix}"
            run = args.out_dir / f"seed{i}" / name
            arms.setdefault(name, []).append(run)
            if (run / "study_run.json").exists():
                continue
            fields = {**world, "model_name_or_path": str(args.from_study / start), "color_negative_prob": p}
            if suffix:
                fields["shuffle_grounding_queries"] = True
            if args.stage == "pmtp":
                fields.update(
                    max_steps=args.steps,
                    learning_rate=args.learning_rate,
                    lr_scheduler_type="cosine",
                    lr_scheduler_kwargs={},
                    warmup_steps=0,
                    dataset_seed=3,  # samples neither phase saw
                )
            settings = {**fields, "cache_dir": str(args.out_dir / "cache"), **_run_settings(run, seed)}
            kwargs = {"stage": stage, "config_stage": config, "out": str(run), "settings": settings}
            jobs.append(Job(f"train seed{i}/{name}", train_run, kwargs, log=run / "train.log"))
    return jobs, arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-study", type=Path, required=True, help="a finished validation study")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000, help="pmtp: steps of the continuation")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="pmtp: peak learning rate")
    parser.add_argument("--seeds", type=int, default=None, help="the study's first N seeds (default: all)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--shuffle-queries", action="store_true", help="the arm (not the control) asks its queries shuffled"
    )
    parser.add_argument("stage", choices=("djo", "pmtp", "pmtp_base"))
    parser.add_argument("prob", type=float, help="color_negative_prob of the arm")
    args = parser.parse_args()
    if not (args.from_study / "study_validation.json").is_file():
        parser.error(f"--from-study {args.from_study}: no study_validation.json (not a finished validation study)")
    world, seeds, layouts = _study_world(args.from_study)
    seeds = seeds[: args.seeds] if args.seeds else seeds
    if args.stage == "pmtp_base":
        seeds = seeds[:1]  # a study trains one first phase, on its first seed
    jobs, arms = _plan(args, world, seeds)
    run_jobs(jobs, args.jobs, prefix="[colors]")

    config = ShapesConfig(**{k.removeprefix("shapes_"): v for k, v in world.items()})
    targets, real_codes = study_layouts("validation", layouts, config)
    reference, _ = load_trained(args.from_study / "pmtp")
    scores = {
        arm: [_score(run, run / "validation_scores.json", reference, targets, real_codes, config) for run in runs]
        for arm, runs in arms.items()
    }
    for arm, runs in arms.items():
        for run, result in zip(runs, scores[arm]):
            result["reward_check"].update(_query_variants(run, targets, config))
    summary = {}
    for arm, results in scores.items():
        check = summarize_reward_check({"djo": results}, 2000)["djo"]
        summary[arm] = {m: bootstrap_ci(_matrix(results, m), 2000) for m in METRICS}
        check.update({v: bootstrap_ci(_check_matrix(results, v), 2000) for v in QUERY_VARIANTS})
        summary[arm].update(reward_check=check, reward_gate=reward_gate(check))
    control = f"{_stem(args)}_color0"
    (arm,) = [a for a in scores if a != control]
    differences = {
        m: paired_difference(_matrix(scores[arm], m), _matrix(scores[control], m), n_resamples=2000) for m in METRICS
    }
    for d in ("correct", "other_color", "filled", *QUERY_VARIANTS):
        differences[f"reward_check_{d}"] = paired_difference(
            _check_matrix(scores[arm], d), _check_matrix(scores[control], d), n_resamples=2000
        )
    report = {
        "split": "validation",
        "from_study": str(args.from_study),
        "stage": args.stage,
        "color_negative_prob": args.prob,
        "shuffle_grounding_queries": args.shuffle_queries,
        **({"steps": args.steps, "learning_rate": args.learning_rate} if args.stage == "pmtp" else {}),
        **({"config": "recipes/configs/pmtp/shapes_tiny.yaml"} if args.stage == "pmtp_base" else {}),
        "seeds": seeds,
        "layouts": len(targets),
        "arms": summary,
        f"{arm}_vs_{control}": differences,
        **provenance(),
    }
    path = args.out_dir / f"color_negatives_validation_{arm}.json"
    print(f"wrote {write_report(report, path)}")
    for name in (control, arm):
        check = summary[name]["reward_check"]
        drawn = ("correct", "filled", "other_kind", "other_color", *QUERY_VARIANTS)
        cells = ", ".join(f"{d} {check[d]['mean']:.3f}" for d in drawn)
        print(
            f"{name}: {cells}; strict50 {summary[name]['strict50']['mean']:.3f}, color {summary[name]['color']['mean']:.3f}"
        )


if __name__ == "__main__":
    main()
