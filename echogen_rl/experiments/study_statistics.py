"""A study's statistics (see [`echogen_rl.experiments.study`]): each arm's means and each comparison's paired
differences over the same layouts and seeds, with bootstrap intervals ([`echogen_rl.eval.stats`])."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from echogen_rl.eval.coco_ap import ResampledAP
from echogen_rl.eval.stats import bootstrap_ci, paired_difference
from echogen_rl.experiments.jobs import Job, run_jobs
from echogen_rl.experiments.study_scoring import MODES
from echogen_rl.layout import Layout

if TYPE_CHECKING:
    from echogen_rl.experiments.study import StudyBudget

COMPARISONS = {
    "djo_vs_pmtp_continued": ("djo", "pmtp_continued"),
    "cyclerl_vs_sft_continued": ("cyclerl", "sft_continued"),
    "cyclerl_vs_shuffled_reward": ("cyclerl", "cyclerl_shuffled"),
    "djo_vs_pmtp": ("djo", "pmtp"),
    "cyclerl_vs_pmtp": ("cyclerl", "pmtp"),
    "cyclerl_vs_djo": ("cyclerl", "djo"),  # the model CycleRL starts from: does its grounding survive?
}
# Scored per layout (a mean over its entities), so that they get paired bootstrap intervals.
LAYOUT_METRICS = ("cycle_miou_ref", "cycle_miou_policy", "tolerant_l2i", "strict50", "color", "grounding_miou")
AP_RESAMPLES = 1000


def _scores(evals: list[dict], metric: str) -> np.ndarray:
    """`[seeds, layouts]` of one metric (a name of `LAYOUT_METRICS`, `_greedy` appended for greedy images), NaN
    where it does not apply."""
    rows = []
    for e in evals:
        if metric == "grounding_miou":
            row = e["grounding_miou"]
        elif metric.endswith("_greedy"):
            row = e["_greedy"]["scores"][metric.removesuffix("_greedy")]
        else:
            row = e["_t1"]["scores"][metric]
        rows.append([math.nan if v is None else v for v in row])
    return np.array(rows, dtype=np.float64)


def _seed_aps(evals: list[dict], targets: list[Layout], mode: str) -> list[ResampledAP]:
    """One [`ResampledAP`] per seed, over that seed's oracle detections; a run listed for several seeds (PMTP, which
    every seed starts from) gets one object, which [`ap_difference`] scores once per resample."""
    built: dict[int, ResampledAP] = {}
    for e in evals:
        if id(e) not in built:
            built[id(e)] = ResampledAP([Layout.from_dict(d) for d in e[mode]["detections"]], targets)
    return [built[id(e)] for e in evals]


def ap_difference(treatment: list[ResampledAP], control: list[ResampledAP], n_resamples: int) -> dict:
    """AP and AP50 of treatment minus control: the mean over seeds of each seed's difference (seed `s` of one arm
    pairs with seed `s` of the other), with a percentile interval from resampling seeds and layouts alike in both
    arms, as [`paired_difference`] does for per-layout metrics (AP itself is recomputed on every resample)."""
    rng = np.random.default_rng(0)
    seeds, items = len(treatment), treatment[0].size

    def mean_difference(chosen_seeds, images):
        scored = {}  # AP of each distinct object, once

        def ap(arm):
            if id(arm) not in scored:
                scored[id(arm)] = arm.ap(images)
            return scored[id(arm)]

        per_seed = {s: (ap(treatment[s]), ap(control[s])) for s in set(chosen_seeds)}
        return {
            k: float(np.mean([per_seed[s][0][k] - per_seed[s][1][k] for s in chosen_seeds])) for k in ("ap", "ap50")
        }

    point = mean_difference(range(seeds), None)
    draws = {"ap": [], "ap50": []}
    for _ in range(n_resamples):
        chosen = rng.integers(0, seeds, seeds) if seeds > 1 else [0]
        drawn = mean_difference(chosen, rng.integers(0, items, items).tolist())
        for k in draws:
            draws[k].append(drawn[k])
    out = {}
    for k, values in draws.items():
        low, high = np.quantile(values, [0.025, 0.975])
        out[k] = {"diff": point[k], "ci_low": float(low), "ci_high": float(high), "seeds": seeds}
    return out


def summarize(
    evals: dict[str, list[dict]], targets: list[Layout], budget: StudyBudget, workers: int | None = None
) -> dict:
    """Per arm: means with intervals; per comparison: paired differences with intervals.

    The AP intervals (AP recomputed on every resample: most of the time here) run as jobs, `workers` at a time
    ([`echogen_rl.experiments.jobs.run_jobs`]; 1 runs them here)."""
    metrics = [m + s for m in LAYOUT_METRICS if m != "grounding_miou" for s in MODES] + ["grounding_miou"]
    arms = {}
    for arm, arm_evals in evals.items():
        arms[arm] = {m: bootstrap_ci(_scores(arm_evals, m), budget.n_resamples) for m in metrics}
        for suffix in MODES:
            mode = suffix or "_t1"
            per_seed = [ap.ap() for ap in _seed_aps(arm_evals, targets, mode)]
            for k in ("ap", "ap50"):
                values = [a[k] for a in per_seed]
                arms[arm][k + suffix] = {"mean": float(np.mean(values)), "per_seed": values}
    comparisons, ap_jobs = {}, []
    for name, (treat, ctrl) in COMPARISONS.items():
        if not (evals.get(treat) and evals.get(ctrl)):
            continue  # a stage the study did not compare
        t_evals, c_evals = evals[treat], evals[ctrl]
        if len(c_evals) == 1 and len(t_evals) > 1:  # PMTP was trained once: every seed starts from it
            c_evals = c_evals * len(t_evals)
        comparisons[name] = {
            m: paired_difference(_scores(t_evals, m), _scores(c_evals, m), n_resamples=budget.n_resamples)
            for m in metrics
        }
        for suffix in MODES:
            mode = suffix or "_t1"
            kwargs = {
                "treatment": _seed_aps(t_evals, targets, mode),
                "control": _seed_aps(c_evals, targets, mode),
                "n_resamples": min(AP_RESAMPLES, budget.n_resamples),
            }
            ap_jobs.append((name, suffix, Job(f"{name}/ap{suffix}", ap_difference, kwargs, light=True)))
    done = run_jobs([job for _, _, job in ap_jobs], workers, quiet=True)
    for name, suffix, job in ap_jobs:
        comparisons[name]["ap" + suffix] = done[job.name]["ap"]
        comparisons[name]["ap50" + suffix] = done[job.name]["ap50"]
    return {"arms": arms, "comparisons": comparisons}
