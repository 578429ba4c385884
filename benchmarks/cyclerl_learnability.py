"""Can CycleRL's GRPO climb a reward under its settings? Seed 0's training logs, from a validation study's DJO.

    python benchmarks/cyclerl_learnability.py --from-study outputs/val --out-dir outputs/learnability \
        --out benchmarks/results/study_6shapes_validation/cyclerl_learnability.json

Each run is the study's seed-0 CycleRL run (the same settings, model and prompts) with one reward and one KL
coefficient (`beta`):

- `background_share` (`echogen_rl.rewards.controls`): the share of background codes in the image. Any policy
  climbs it by drawing less, so a run that does not is held back by its settings, not by a weak reward signal.
- `cycle`: the study's own rewards (`cycle_iou`, `grounding_format`). The shipped `beta` is the study's own
  seed-0 CycleRL run, linked (hard links), not trained again.

All runs share seed 0, so logging window k sees the same prompts in every run of one length: the cycle runs are
compared with the shipped one window by window. Writes each run's windows (mean reward, KL, entropy, the oracle's
strict shape accuracy and filled-box rate) and, per run, the reward's change from the first window to the last
and its mean difference from the shipped run's windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
from pathlib import Path

import yaml
from common import write_json

from echogen_rl.experiments.jobs import run_settings, shapes_config
from echogen_rl.experiments.study import train_run

WINDOW_METRICS = {
    "reward": "reward",
    "kl": "kl",
    "entropy": "entropy",
    "strict50": "monitor/strict50",
    "filled_box_rate": "monitor/filled_box_rate",
}
BACKGROUND_REWARD = "echogen_rl.rewards.controls:background_share"


def variants(shipped_beta: float, betas: list[float]) -> dict[str, tuple[str, float]]:
    """`{run name: (reward, beta)}`: the background reward at the shipped beta and at 0, the cycle reward at the
    shipped beta and each of `betas`."""
    runs = {f"background_beta{b:g}": ("background", b) for b in dict.fromkeys([shipped_beta, 0.0])}
    runs |= {f"cycle_beta{b:g}": ("cycle", b) for b in dict.fromkeys([shipped_beta, *betas])}
    return runs


def windows(record: dict) -> list[dict]:
    """The run's logged windows: the step and each metric's value over the window (`None` where the run logged none:
    TRL computes no KL at `beta: 0`)."""
    rows = []
    for entry in record["log_history"]:
        if "reward" in entry:
            rows.append({"step": entry["step"], **{k: entry.get(m) for k, m in WINDOW_METRICS.items()}})
    if not rows:
        raise ValueError("the run logged no reward: not a CycleRL run")
    return rows


def summarize(runs: dict[str, list[dict]], shipped: str) -> dict:
    """Per run: the reward's first and last windows, and its mean difference from the shipped run's windows."""
    summary = {}
    for name, rows in runs.items():
        rewards = [r["reward"] for r in rows]
        kl = [r["kl"] for r in rows]
        entry = {
            "first_reward": rewards[0],
            "last_reward": rewards[-1],
            "mean_kl": None if None in kl else statistics.fmean(kl),
        }
        if name.startswith("cycle") and name != shipped:
            base = [r["reward"] for r in runs[shipped]]
            diffs = [a - b for a, b in zip(rewards, base)]
            entry["reward_minus_shipped"] = statistics.fmean(diffs)
            entry["windows_above_shipped"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        summary[name] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-study", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--out", help="the JSON file to write")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.04], help="the cycle reward's other betas")
    parser.add_argument("--background-steps", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    source = args.from_study / "seed0" / "cyclerl"
    if not (args.from_study / "study_validation.json").exists():  # settings are studied on validation only
        raise FileNotFoundError(f"{args.from_study}/study_validation.json is missing: use a validation study")
    shipped = json.loads((source / "study_run.json").read_text())
    base = shipped["settings"]
    shipped_beta = float(base.get("beta", yaml.safe_load(shapes_config("cyclerl").read_text())["beta"]))
    shipped_name = f"cycle_beta{shipped_beta:g}"
    runs = {}
    for name, (reward, beta) in variants(shipped_beta, args.betas).items():
        out = args.out_dir / name
        if name == shipped_name:
            if not out.exists():
                shutil.copytree(source, out, copy_function=os.link)
        elif not (out / "study_run.json").exists():
            settings = {**base, **run_settings(out, 0), "logging_steps": base.get("logging_steps", 10), "beta": beta}
            if reward == "background":
                settings |= {
                    "reward_funcs": [BACKGROUND_REWARD],
                    "reward_weights": [1.0],
                    "max_steps": args.background_steps,
                }
            print(f"training {name}", flush=True)
            train_run("cyclerl", "cyclerl", str(out), settings)
        runs[name] = windows(json.loads((out / "study_run.json").read_text()))
    result = {
        "from_study": args.from_study.as_posix(),
        "settings": base,
        "shipped_beta": shipped_beta,
        "summary": summarize(runs, shipped_name),
        "runs": runs,
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
