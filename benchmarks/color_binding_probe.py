"""Can the tiny model's grounder bind a color word at all? I2L alone, from the tiny checkpoint, on the validation split.

    python benchmarks/color_binding_probe.py --out-dir outputs/binding --steps 3000

In the shapes world every color appears at most once per image, so a phrase's color alone names its shape. Yet every
grounder the study trains answers a drawing whose shapes are all in unnamed colors as it answers the correct one
(`correct - other_color` near 0), and asked one phrase at a time it does not find the shape
(`benchmarks/results/study_6shapes_validation/color_negatives/`). This probe takes away everything else: the shipped
first PMTP phase on the validation study's world, grounding only (`image_loss_weight: 0`), from the tiny checkpoint,
for `--steps`, with the phrases asked in reading order (`ordered`, as the study asks them) and shuffled
(`shuffled`, `shuffle_grounding_queries`: phrase i can only be matched to its shape by its words). Both runs are
scored as `color_negatives_validation.py` scores a grounder: the reward check's five drawings, the reversed query and
one phrase per query, on the study's validation layouts. Writes `color_binding_probe.json` to `--out-dir`.

`--image-positions` tests why: it adds a fixed 2D sinusoidal embedding of each code's cell (row and column, at the
code embeddings' own scale) to the image embeddings, in training and scoring alike. Janus has no such thing on its
generation path, where the image reaches the language model as code embeddings placed only by rotary attention; the
flag exists in this probe alone, to ask whether the grounder lacks a phrase's shape or its place.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from color_negatives_validation import QUERY_VARIANTS, _query_variants
from common import provenance

from echogen_rl.data.shapes import ShapesConfig, render_codes
from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.reward_check import DRAWINGS, reward_check
from echogen_rl.eval.stats import bootstrap_ci, paired_difference
from echogen_rl.experiments.jobs import Job, run_jobs
from echogen_rl.experiments.study import _run_settings, train_run
from echogen_rl.experiments.study_scoring import SCORING_BATCH, study_layouts
from echogen_rl.layout import pairwise_iou
from echogen_rl.models import modeling
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.loading import load_trained
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.tiny import TinyJanusConfig, ensure_tiny_checkpoint

ARMS = {"ordered": False, "shuffled": True}
HITS = ("boxes_on_some_shape", "boxes_on_asked_shape")


def cell_positions(grid_size: int, hidden_size: int) -> torch.Tensor:
    """`[grid_size**2, hidden_size]`: each cell's row in the first half of the channels, its column in the second,
    as sines and cosines of several frequencies (unit scale)."""
    quarter = hidden_size // 4
    freqs = 1.0 / (10.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    cells = torch.arange(grid_size**2)
    halves = []
    for axis in (cells // grid_size, cells % grid_size):
        angles = axis[:, None].float() * freqs[None, :]
        halves.append(torch.cat([angles.sin(), angles.cos()], dim=-1))
    out = torch.zeros(grid_size**2, hidden_size)
    out[:, : 4 * quarter] = torch.cat(halves, dim=-1)
    return out


def add_image_positions(grid_size: int) -> None:
    """Patches `embed_codes` (every image embedding of a forward and of the grounder goes through it) to add
    [`cell_positions`] at the embeddings' scale. Images are whole grids in row-major order, so a code's cell is its
    index among the image positions, modulo the grid."""
    original = modeling.embed_codes

    def embed_codes(model, codes):
        embeds = original(model, codes)
        table = cell_positions(grid_size, embeds.shape[-1]).to(embeds.device, embeds.dtype)
        cells = torch.arange(codes.numel(), device=embeds.device) % grid_size**2
        scale = embeds.detach().pow(2).mean().sqrt() / table.pow(2).mean().sqrt()
        return embeds + scale * table[cells].view(*codes.shape, -1)

    modeling.embed_codes = embed_codes


def _scores(run: Path, targets, config: ShapesConfig) -> dict[str, list[float | None]]:
    """Per layout, the cycle IoU the run's grounder gives each drawing and query variant, and its box hits (cached in
    the run; a cache without some of them gets them added)."""
    cache = run / "probe_scores.json"
    scores = json.loads(cache.read_text()) if cache.exists() else {}
    if set(DRAWINGS) | set(QUERY_VARIANTS) | set(HITS) <= set(scores):
        return scores
    model, tokenizer = load_trained(run)
    grounder = Grounder(model, PromptBuilder(tokenizer, config.grid_size**2), SCORING_BATCH)
    if not set(DRAWINGS) <= set(scores):
        scores.update(reward_check(grounder, targets, config))
    if not set(QUERY_VARIANTS) <= set(scores):
        scores.update(_query_variants(run, targets, config))
    if not set(HITS) <= set(scores):
        scores.update(box_hits(grounder, targets, config))
    cache.write_text(json.dumps(scores) + "\n")
    return scores


def box_hits(grounder, targets, config: ShapesConfig) -> dict[str, list[float]]:
    """Per layout of two or more shapes, asked its phrases in reverse reading order on its correct drawing: the share
    of answered boxes on some shape of the image (IoU >= 0.5 with any of its boxes) and on the shape asked for. A
    grounder that finds a phrase by its words has both alike; one that lists the shapes in reading order under
    whatever names it is asked has the first high and the second low."""
    many = [t for t in targets if len(t.entities) > 1]
    codes = torch.tensor([render_codes(t, config) for t in many])
    results = grounder(codes, [t.phrases[::-1] for t in many])
    on_some, on_asked = [], []
    for target, result in zip(many, results):
        if not result.layout.entities:
            continue
        truth = torch.tensor(target.boxes, dtype=torch.float32)
        answered = torch.tensor(result.layout.boxes, dtype=torch.float32)
        asked = torch.tensor([target.boxes[target.phrases.index(e.phrase)] for e in result.layout.entities])
        on_some.append(float((pairwise_iou(answered, truth).amax(-1) >= 0.5).float().mean()))
        on_asked.append(float((pairwise_iou(answered, asked).diagonal() >= 0.5).float().mean()))
    return {"boxes_on_some_shape": on_some, "boxes_on_asked_shape": on_asked}


def _column(values: list[float | None]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in values]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--learning-rate", type=float, default=2e-3, help="the first phase's (shapes_tiny.yaml)")
    parser.add_argument("--max-shapes", type=int, default=6, help="the validation study's world")
    parser.add_argument("--layouts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=4, help="decoder layers of the tiny checkpoint")
    parser.add_argument("--image-positions", action="store_true", help="add each code's cell to its embedding")
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each with 2)")
    args = parser.parse_args()

    config = ShapesConfig(max_shapes=args.max_shapes)
    if args.image_positions:
        if args.jobs != 1:
            parser.error("--image-positions patches this process: it needs --jobs 1 (runs in this process)")
        add_image_positions(config.grid_size)
    tiny_config = TinyJanusConfig(grid_size=config.grid_size, num_layers=args.num_layers)
    tiny = ensure_tiny_checkpoint(args.out_dir / "tiny-janus", tiny_config)
    if json.loads((tiny / "tiny_janus.json").read_text())["num_layers"] != args.num_layers:
        parser.error(f"--out-dir {args.out_dir}: its tiny checkpoint has another number of layers")
    jobs, runs = [], {}
    for arm, shuffled in ((a, ARMS[a]) for a in args.arms):
        run = runs[arm] = args.out_dir / arm
        if (run / "study_run.json").exists():
            continue
        fields = {
            "shapes_max_shapes": args.max_shapes,
            "model_name_or_path": str(tiny),
            "image_loss_weight": 0.0,
            "max_steps": args.steps,
            "learning_rate": args.learning_rate,
            "shuffle_grounding_queries": shuffled,
        }
        settings = {**fields, "cache_dir": str(args.out_dir / "cache"), **_run_settings(run, args.seed)}
        kwargs = {"stage": "pmtp", "config_stage": "pmtp", "out": str(run), "settings": settings}
        jobs.append(Job(f"train {arm}", train_run, kwargs, log=run / "train.log"))
    run_jobs(jobs, args.jobs, prefix="[binding]")

    targets, _ = study_layouts("validation", args.layouts, config)
    scores = {arm: _scores(run, targets, config) for arm, run in runs.items()}
    arms = {}
    for arm, s in scores.items():
        record = json.loads((runs[arm] / "study_run.json").read_text())
        losses = [h["loss"] for h in record["log_history"] if "loss" in h]
        arms[arm] = {
            **{d: bootstrap_ci(_column(s[d]), 2000) for d in (*DRAWINGS, *QUERY_VARIANTS, *HITS)},
            "correct_minus_other_color": paired_difference(
                _column(s["correct"]), _column(s["other_color"]), n_resamples=2000
            ),
            "correct_one_phrase_minus_other_color_one_phrase": paired_difference(
                _column(s["correct_one_phrase"]), _column(s["other_color_one_phrase"]), n_resamples=2000
            ),
            "loss_first_100_steps": float(np.mean(losses[:10])),
            "loss_last_100_steps": float(np.mean(losses[-10:])),
            "training_seconds": record["seconds"],
        }
    report = {
        "split": "validation",
        "world": {"max_shapes": args.max_shapes, "grid_size": config.grid_size},
        "model": {"hidden_size": tiny_config.hidden_size, "num_layers": tiny_config.num_layers},
        "image_positions": args.image_positions,
        "stage": "pmtp first phase (recipes/configs/pmtp/shapes_tiny.yaml), grounding only",
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "layouts": len(targets),
        "arms": arms,
        **provenance(),
    }
    path = args.out_dir / "color_binding_probe.json"
    print(f"wrote {write_report(report, path)}")
    for arm, a in arms.items():
        cells = ", ".join(f"{d} {a[d]['mean']:.3f}" for d in (*DRAWINGS, *QUERY_VARIANTS, *HITS))
        print(f"{arm}: {cells}; loss {a['loss_first_100_steps']:.3f} -> {a['loss_last_100_steps']:.3f}")


if __name__ == "__main__":
    main()
