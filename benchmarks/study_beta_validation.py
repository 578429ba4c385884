"""Chooses CycleRL's KL coefficient on the validation split, from a finished study's seed-0 DJO model.

    python benchmarks/study_beta_validation.py --study-dir outputs/study --out-dir outputs/beta 0.04 0.4

Trains the shipped shapes CycleRL config once per `beta` (seed 0, everything else as the study runs it), then scores
DJO, SFT continued, the study's own CycleRL run and each new run on the validation layouts (never the held-out
ones) with the study's scorer. Writes `beta_validation.json` to `--out-dir`; the shipped value came from
`benchmarks/results/study/beta_validation.json`.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import numpy as np
import torch

from echogen_rl.data.shapes import ShapesConfig, build_shapes_dataset
from echogen_rl.data.splits import VALIDATION_SEED
from echogen_rl.eval.coco_ap import ResampledAP
from echogen_rl.eval.evaluation import write_report
from echogen_rl.experiments.study import _run_settings, train_run
from echogen_rl.experiments.study_scoring import evaluate_model
from echogen_rl.layout import Layout
from echogen_rl.models.loading import load_trained

METRICS = ("cycle_miou_ref", "cycle_miou_policy", "tolerant_l2i", "strict50", "color")


def summarize(result: dict, targets: list[Layout]) -> dict:
    row = {}
    for mode in ("_t1", "_greedy"):
        for metric in METRICS:
            values = [v for v in result[mode]["scores"][metric] if v is not None]
            row[metric + mode] = round(float(np.mean(values)), 3)
        detections = [Layout.from_dict(d) for d in result[mode]["detections"]]
        row["ap" + mode] = round(ResampledAP(detections, targets).ap()["ap"], 3)
    row["grounding_acc50"] = round(result["grounding"]["acc50"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-dir", type=Path, default=Path("outputs/study"))
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--layouts", type=int, default=256)
    parser.add_argument("betas", type=float, nargs="+")
    args = parser.parse_args()
    study, out = args.study_dir, args.out_dir
    djo = study / "seed0" / "djo"
    log: list = []
    for beta in args.betas:
        run = out / f"cyclerl_beta{beta:g}"
        settings = {"model_name_or_path": str(djo), "cache_dir": str(study / "cache"), **_run_settings(run, 0)}
        log.append(train_run("cyclerl", "cyclerl", str(run), {**settings, "beta": beta}))

    data = build_shapes_dataset(args.layouts, seed=VALIDATION_SEED)
    targets = [Layout.from_json(t) for t in data["layout"]]
    for target, caption in zip(targets, data["caption"]):
        target.caption = caption
    real_codes = torch.tensor(data["image_codes"])
    reference, _ = load_trained(study / "pmtp")
    runs = {
        "djo": djo,
        "sft_continued": study / "seed0" / "sft_continued",
        "cyclerl_study": study / "seed0" / "cyclerl",
    }
    runs.update({f"cyclerl_beta{b:g}": out / f"cyclerl_beta{b:g}" for b in args.betas})
    rows = {}
    for name, path in runs.items():
        base = djo if (path / "adapter_config.json").exists() else None
        model, tokenizer = load_trained(path, base)
        rows[name] = summarize(
            evaluate_model(model, tokenizer, reference, targets, real_codes, ShapesConfig()), targets
        )
        print(name, rows[name], flush=True)
        del model
        gc.collect()
    report = {"split": "validation", "layouts": len(targets), "seed": 0, "from": str(djo), "runs": rows, "train": log}
    print(f"wrote {write_report(report, out / 'beta_validation.json')}")


if __name__ == "__main__":
    main()
