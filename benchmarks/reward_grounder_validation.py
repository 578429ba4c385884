"""Chooses PMTP's `kind_negative_prob` on the validation split: does the grounder, and so the cycle reward, see shape?

    python benchmarks/reward_grounder_validation.py --out-dir outputs/kind_negatives 0 0.3 0.6

Trains the shipped shapes PMTP config once per value (seed 0, everything else as the study runs it; the runs go side
by side, one per core), then scores each model on the validation layouts (never the held-out ones): the reward check
(cycle IoU its grounder gives a correct drawing, the boxes filled with their colors, another kind in each box, an
empty image; paired intervals), its grounding of the real images, and its L2I scores as the study scores them.
Writes `kind_negatives_validation.json` to `--out-dir`; the shipped value came from
`benchmarks/results/study/kind_negatives_validation.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import numpy as np
from common import provenance

from echogen_rl.data.shapes import ShapesConfig
from echogen_rl.eval.coco_ap import ResampledAP
from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.reward_check import reward_check, reward_gate, summarize_reward_check
from echogen_rl.experiments.jobs import Job, run_jobs
from echogen_rl.experiments.study import _run_settings, train_run
from echogen_rl.experiments.study_scoring import SCORING_BATCH, evaluate_model, study_layouts
from echogen_rl.layout import Layout
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.loading import load_trained
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.tiny import ensure_tiny_checkpoint

METRICS = ("cycle_miou_ref", "tolerant_l2i", "strict50", "color")


def l2i_row(result: dict, targets: list[Layout]) -> dict:
    row = {}
    for mode in ("_t1", "_greedy"):
        for metric in METRICS:
            values = [v for v in result[mode]["scores"][metric] if v is not None]
            row[metric + mode] = round(float(np.mean(values)), 3)
        detections = [Layout.from_dict(d) for d in result[mode]["detections"]]
        row["ap" + mode] = round(ResampledAP(detections, targets).ap()["ap"], 3)
    row["grounding_miou"] = round(float(np.mean([v for v in result["grounding_miou"] if v is not None])), 3)
    row["grounding_acc50"] = round(result["grounding"]["acc50"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--layouts", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="PMTP steps (default: the config's)")
    parser.add_argument("probs", type=float, nargs="+")
    args = parser.parse_args()
    out = args.out_dir
    tiny = out / "tiny-janus"
    ensure_tiny_checkpoint(tiny)
    runs = {p: out / f"pmtp_kind{p:g}" for p in args.probs}
    jobs = [
        Job(
            f"train kind_negative_prob={p:g}",
            train_run,
            {
                "stage": "pmtp",
                "config_stage": "pmtp",
                "out": str(run),
                "settings": {
                    "model_name_or_path": str(tiny),
                    "kind_negative_prob": p,
                    **({"max_steps": args.max_steps} if args.max_steps else {}),
                    **_run_settings(run, 0),
                },
            },
            log=run / "train.log",
        )
        for p, run in runs.items()
        if not (run / "study_run.json").exists()
    ]
    run_jobs(jobs, args.jobs, prefix="[validation]")

    config = ShapesConfig()
    targets, real_codes = study_layouts("validation", args.layouts, config)
    rows = {}
    for p, run in runs.items():
        model, tokenizer = load_trained(run)
        result = evaluate_model(model, tokenizer, model, targets, real_codes, config)
        grounder = Grounder(model, PromptBuilder(tokenizer, real_codes.shape[1]), SCORING_BATCH)
        result["reward_check"] = reward_check(grounder, targets, config)
        check = summarize_reward_check({"pmtp": [result]}, 2000)["pmtp"]
        rows[f"{p:g}"] = {
            "reward_check": check,
            "gate": reward_gate(check),
            "l2i_and_grounding": l2i_row(result, targets),
        }
        means = ", ".join(f"{d} {check[d]['mean']:.3f}" for d in ("correct", "filled", "other_kind", "empty"))
        print(f"kind_negative_prob={p:g}: {means}; {rows[f'{p:g}']['l2i_and_grounding']}", flush=True)
        del model
        gc.collect()
    previous = out / "kind_negatives_validation.json"
    if previous.exists():  # the values scored by an earlier call stay, each with the commit that scored it
        earlier = json.loads(previous.read_text())
        for key, row in earlier["runs"].items():
            rows.setdefault(key, {**row, "commit": row.get("commit", earlier.get("commit"))})
    report = {
        "split": "validation",
        "layouts": len(targets),
        "seed": 0,
        "config": "recipes/configs/pmtp/shapes_tiny.yaml",
        "runs": rows,
        **provenance(),
    }
    print(f"wrote {write_report(report, out / 'kind_negatives_validation.json')}")


if __name__ == "__main__":
    main()
