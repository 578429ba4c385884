"""What sample logging costs on the tiny shapes configs: seconds per image-logging step, against a run without it.

    python benchmarks/sample_logging.py --out outputs/bench/sample_logging.json

Runs the shipped shapes PMTP and CycleRL configs for a few steps twice in this process, logging to TensorBoard, once
with `log_images_steps` and once without, and reports the median seconds of each logging step (generation of the
fixed layouts, grounding, drawing, writing; CycleRL also draws one rollout group) and the wall-time ratio of the
two runs. Run it alone: a second torch process on 2 cores slows both about tenfold.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from echogen_rl.eval.evaluation import write_report
from echogen_rl.experiments.jobs import run_settings
from echogen_rl.models.tiny import build_tiny_checkpoint
from echogen_rl.scripts.runner import run_recipe
from echogen_rl.trainer.callbacks import SampleImagesCallback

REPO = Path(__file__).resolve().parents[1]

STAGES = {
    "pmtp": {"max_steps": 20, "num_train_samples": 320},
    "cyclerl": {"max_steps": 10, "num_train_samples": 40},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--every", type=int, default=2, help="log_images_steps of the logging run")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = build_tiny_checkpoint(tmp / "tiny")
        for stage, budget in STAGES.items():
            config = REPO / "recipes" / "configs" / stage / "shapes_tiny.yaml"
            # CycleRL starts from the untrained tiny model here: the cost of logging does not depend on training.
            common = {**budget, "model_name_or_path": str(tiny), "cache_dir": str(tmp / "cache")}
            runs = {}
            for name, every in (("without", 0), ("with", args.every)):
                settings = {**common, **run_settings(tmp / f"{stage}-{name}"), "report_to": "tensorboard"}
                start = time.perf_counter()
                trainer = run_recipe(stage, config, {**settings, "log_images_steps": every})
                seconds = time.perf_counter() - start
                callback = next(
                    (c for c in trainer.callback_handler.callbacks if isinstance(c, SampleImagesCallback)), None
                )
                runs[name] = {"seconds": seconds, "logging_steps": callback.seconds if callback else []}
            logged = runs["with"]["logging_steps"]
            results[stage] = {
                "steps": budget["max_steps"],
                "log_images_steps": args.every,
                "images_per_grid": 8,
                "median_seconds_per_logging_step": statistics.median(logged) if logged else None,
                "logging_steps": len(logged),
                "run_seconds_with": runs["with"]["seconds"],
                "run_seconds_without": runs["without"]["seconds"],
                "ratio_with_vs_without": runs["with"]["seconds"] / runs["without"]["seconds"],
            }
            print(stage, results[stage], flush=True)
    print(f"wrote {write_report({'threads': torch.get_num_threads(), 'stages': results}, args.out)}")


if __name__ == "__main__":
    main()
