"""How much CycleRL's reward still says, per study: from each seed's CycleRL run (its `study_run.json` log), the share
of groups whose 8 images all earned the same reward (GRPO's advantage is 0 there, so they teach nothing), the reward's
spread within a group, and the reward-hacking monitor (filled boxes, strict shape accuracy) over training.

    python benchmarks/cyclerl_groups.py outputs/study_two_cycles --out benchmarks/results/study_two_cycles/cyclerl_groups.json

Each metric is the mean over the run's logged steps, then over seeds (with the seeds' range).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import provenance

from echogen_rl.eval.evaluation import write_report

METRICS = (
    "frac_reward_zero_std",
    "reward_std",
    "rewards/cycle_iou/mean",
    "monitor/filled_box_rate",
    "monitor/strict50",
)


def run_means(record: dict) -> dict[str, float]:
    """Each metric's mean over the logged training steps of one run."""
    means = {}
    for metric in METRICS:
        values = [entry[metric] for entry in record["log_history"] if metric in entry]
        if not values:
            raise ValueError(f"no {metric!r} in the run's log: not a CycleRL run of this version")
        means[metric] = statistics.fmean(values)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a study's --output-dir (seedN/cyclerl/study_run.json inside)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = sorted(args.study.glob("seed*/cyclerl/study_run.json"))
    if not runs:
        parser.error(f"{args.study}: no seed*/cyclerl/study_run.json (not a finished study)")
    per_seed = {run.parent.parent.name: run_means(json.loads(run.read_text())) for run in runs}
    summary = {
        metric: {
            "mean": statistics.fmean(seed[metric] for seed in per_seed.values()),
            "min": min(seed[metric] for seed in per_seed.values()),
            "max": max(seed[metric] for seed in per_seed.values()),
        }
        for metric in METRICS
    }
    found = [args.study / name for name in ("study.json", "study_validation.json") if (args.study / name).exists()]
    if not found:
        raise FileNotFoundError(f"{args.study} holds no study.json or study_validation.json: is it a finished study?")
    study = json.loads(found[0].read_text())
    report = {
        "split": study["split"],
        "seed_set": study["seed_set"],
        "study_commit": study["provenance"]["commit"],
        "per_seed": per_seed,
        "summary": summary,
        **provenance(),
    }
    print(f"wrote {write_report(report, args.out)}")


if __name__ == "__main__":
    main()
