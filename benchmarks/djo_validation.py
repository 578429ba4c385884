"""DJO on the validation split: choosing its settings, and the positive control that proves the loop's machinery.

    python benchmarks/djo_validation.py choose --pmtp outputs/kind_negatives/pmtp_kind0.3 --out-dir outputs/djo_choose
    python benchmarks/djo_validation.py control --pmtp outputs/kind_negatives/pmtp_kind0.3 --out-dir outputs/djo_control

- `choose`: from a trained PMTP (seed 0), DJO with each loop image (teacher-forced, self-forced, self-forced with the
  real-image grounding loss mixed in) against PMTP continued, all at one learning rate and step count (both arms
  share them).
- `control`: from an under-trained PMTP (150 steps), DJO without the L2I loss (`l2i_loss_weight: 0`), its loop read
  by the *trained* PMTP's frozen grounder, against PMTP continued over the same steps. Arms (`--arms`): `loop_only`
  (no other loss), `loop_and_i2l` (the loop plus the real-image grounding loss, which keeps the shared layers
  grounding) and `i2l_only` (that grounding loss without the loop: what it alone does to generation). If the loop
  cannot raise an oracle metric here, its gradient path is too weak to matter anywhere. `--sets a b` replicates it:
  each set trains its own seeds (a: 0-2, b: 3-5) and scores its own validation layouts (disjoint slices).

Every model is scored on validation layouts (never held-out ones) as the study scores them; paired differences
against the control get 95% bootstrap intervals over seeds and layouts. Runs go side by side (`--jobs`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from pathlib import Path

import numpy as np
import yaml
from common import provenance

from echogen_rl.data.shapes import ShapesConfig
from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.reward_check import reward_check, reward_gate, summarize_reward_check
from echogen_rl.eval.stats import bootstrap_ci, paired_difference
from echogen_rl.experiments.jobs import Job, run_jobs, shapes_config
from echogen_rl.experiments.study import DJO_CONTROL_FIELDS, _run_settings, train_run
from echogen_rl.experiments.study_scoring import SCORING_BATCH, evaluate_model, study_layouts
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.loading import load_trained
from echogen_rl.models.prompts import PromptBuilder

METRICS = ("cycle_miou_ref", "tolerant_l2i", "strict50", "color")
CONTROL_ARMS = ("loop_only", "loop_and_i2l", "i2l_only")
# The control's replication: each set its own training seeds and its own slice of the validation layouts.
CONTROL_SETS = {"a": {"seeds": [0, 1, 2], "layout_slice": 0}, "b": {"seeds": [3, 4, 5], "layout_slice": 1}}


def _control_settings(djo_fields: dict) -> dict:
    values = {**yaml.safe_load(shapes_config("djo").read_text()), **djo_fields}
    return {k: values[k] for k in DJO_CONTROL_FIELDS if k in values}  # as the study's control


def plan(
    experiment: str,
    pmtp: Path,
    out: Path,
    lr: float,
    steps: int,
    sets: tuple[str, ...] = ("a",),
    control_arms: tuple[str, ...] = CONTROL_ARMS,
) -> tuple[list, dict, Path]:
    """`(runs, arms, start)`: runs as `(name, stage, settings)`, arms as `{arm: [run name per seed]}`."""
    restart = {"learning_rate": lr, "max_steps": steps}
    runs, arms = [], {}
    if experiment == "choose":
        seeds, start = [0], pmtp
        variants = {
            "djo_teacher_forced": {"loop_image": "teacher_forced"},
            "djo_self_forced": {"loop_image": "self_forced"},
            "djo_self_forced_i2l": {"loop_image": "self_forced", "i2l_loss_weight": 1.0},
            "djo_self_forced_i2l_kinds": {
                "loop_image": "self_forced",
                "i2l_loss_weight": 1.0,
                "kind_negative_prob": 0.3,
            },
        }
    else:
        seeds, start = [s for name in sets for s in CONTROL_SETS[name]["seeds"]], out / "pmtp_150"
        frozen = {
            "loop_image": "self_forced",
            "loop_grounder": "frozen",
            "loop_grounder_path": str(pmtp),
            "l2i_loss_weight": 0.0,
            "loop_weight_warmup_steps": 0,
        }
        variants = {
            "loop_only": {**frozen, "i2l_loss_weight": 0.0},  # no real-image grounding loss either
            "loop_and_i2l": {**frozen, "i2l_loss_weight": 1.0},
            "i2l_only": {**frozen, "i2l_loss_weight": 1.0, "loop_weight": 0.0},
        }
        variants = {arm: variants[arm] for arm in control_arms}
    for s in seeds:
        for arm, fields in variants.items():
            name = f"seed{s}/{arm}"
            runs.append((name, "djo", {**restart, **fields, "model_name_or_path": str(start)}))
            arms.setdefault(arm, []).append(name)
        name = f"seed{s}/pmtp_continued"
        runs.append((name, "pmtp", {**_control_settings(restart), "model_name_or_path": str(start)}))
        arms.setdefault("pmtp_continued", []).append(name)
    return runs, arms, start


def _train(args, runs: list, start: Path) -> None:
    out, jobs = args.out_dir, []
    if args.experiment == "control" and not (start / "study_run.json").exists():
        tiny = args.pmtp.parent / "tiny-janus"
        settings = {"model_name_or_path": str(tiny), "max_steps": 150, **_run_settings(start, 0)}
        kwargs = {"stage": "pmtp", "config_stage": "pmtp", "out": str(start), "settings": settings}
        jobs.append(Job("train pmtp_150", train_run, kwargs, log=start / "train.log"))
    for name, stage, fields in runs:
        if (out / name / "study_run.json").exists():
            continue
        seed = int(name.split("/")[0].removeprefix("seed"))
        settings = {**fields, **_run_settings(out / name, seed)}
        after = ("train pmtp_150",) if jobs and jobs[0].name == "train pmtp_150" else ()
        kwargs = {"stage": stage, "config_stage": stage, "out": str(out / name), "settings": settings}
        jobs.append(Job(f"train {name}", train_run, kwargs, after, out / name / "train.log"))
    run_jobs(jobs, args.jobs, prefix=f"[{args.experiment}]")


def _score(path: Path, cache: Path, reference, targets, real_codes, config) -> dict:
    if cache.exists():
        return json.loads(cache.read_text())
    model, tokenizer = load_trained(path)
    result = evaluate_model(model, tokenizer, reference, targets, real_codes, config)
    result = {m: result[m] for m in ("_t1", "_greedy", "grounding_miou")}
    grounder = Grounder(model, PromptBuilder(tokenizer, real_codes.shape[1]), SCORING_BATCH)
    result["reward_check"] = reward_check(grounder, targets, config)
    for mode in ("_t1", "_greedy"):
        result[mode] = {"scores": result[mode]["scores"]}
    write_report(result, cache)
    del model
    gc.collect()
    return result


def _matrix(results: list[dict], metric: str) -> np.ndarray:
    if metric == "grounding_miou":
        rows = [r["grounding_miou"] for r in results]
    else:
        mode = "_greedy" if metric.endswith("_greedy") else "_t1"
        rows = [r[mode]["scores"][metric.removesuffix("_greedy")] for r in results]
    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)


def _compare(args, arms: dict, start: Path, seeds: list[int], layout_slice: int) -> dict:
    """One set's arms (its seeds' runs, scored on its slice of the validation layouts) against PMTP continued."""
    out, config = args.out_dir, ShapesConfig()
    targets, real_codes = study_layouts("validation", args.layouts * (layout_slice + 1), config)
    targets, real_codes = targets[args.layouts * layout_slice :], real_codes[args.layouts * layout_slice :]
    reference, _ = load_trained(args.pmtp)
    cache_name = "validation_scores.json" if layout_slice == 0 else f"validation_scores_{layout_slice}.json"
    ours = {f"seed{s}" for s in seeds}
    rows = [("start", [None])] + [(arm, [n for n in names if n.split("/")[0] in ours]) for arm, names in arms.items()]
    scores: dict[str, list[dict]] = {}
    for arm, names in rows:
        for name in names:
            path = start if name is None else out / name
            scores.setdefault(arm, []).append(_score(path, path / cache_name, reference, targets, real_codes, config))
    metrics = [m + s for m in METRICS for s in ("", "_greedy")] + ["grounding_miou"]
    summary = {arm: {m: bootstrap_ci(_matrix(r, m), 2000) for m in metrics} for arm, r in scores.items()}
    for arm, results in scores.items():
        check = summarize_reward_check({"djo": results}, 2000)["djo"]
        summary[arm]["reward_check"] = check
        summary[arm]["reward_gate"] = reward_gate(check)
    control = scores["pmtp_continued"]
    differences = {
        f"{arm}_vs_pmtp_continued": {
            m: paired_difference(_matrix(r, m), _matrix(control, m), n_resamples=2000) for m in metrics
        }
        for arm, r in scores.items()
        if arm not in ("pmtp_continued", "start")
    }
    if "loop_and_i2l" in scores and "i2l_only" in scores:  # the loop alone added: everything else is the same
        differences["loop_and_i2l_vs_i2l_only"] = {
            m: paired_difference(_matrix(scores["loop_and_i2l"], m), _matrix(scores["i2l_only"], m), n_resamples=2000)
            for m in metrics
        }
    return {
        "seeds": seeds,
        "layouts": len(targets),
        "layout_slice": layout_slice,
        "arms": summary,
        "differences": differences,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=("choose", "control"))
    parser.add_argument("--pmtp", type=Path, required=True, help="a trained shapes PMTP (seed 0)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layouts", type=int, default=256, help="validation layouts per set")
    parser.add_argument("--sets", nargs="+", choices=list(CONTROL_SETS), default=["a"], help="control: seed sets")
    parser.add_argument("--arms", nargs="+", choices=CONTROL_ARMS, default=list(CONTROL_ARMS), help="control: arms")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    out = args.out_dir
    sets = tuple(args.sets)
    runs, arms, start = plan(args.experiment, args.pmtp, out, args.learning_rate, args.steps, sets, tuple(args.arms))
    _train(args, runs, start)
    if args.experiment == "choose":
        results = {"a": _compare(args, arms, start, [0], 0)}
    else:
        results = {
            name: _compare(args, arms, start, CONTROL_SETS[name]["seeds"], CONTROL_SETS[name]["layout_slice"])
            for name in sets
        }
    training = {}
    for name, _, _ in runs:
        record = json.loads((out / name / "study_run.json").read_text())
        last = [h for h in record["log_history"] if "loss" in h]
        training[name] = {"seconds": round(record["seconds"], 1), "last_log": last[-1] if last else {}}
    report = {
        "experiment": args.experiment,
        "split": "validation",
        "learning_rate": args.learning_rate,
        "steps": args.steps,
        "sets": results,
        "runs": {
            name: {"stage": stage, **{k: v for k, v in fields.items() if k != "model_name_or_path"}}
            for name, stage, fields in runs
        },
        "training": training,
        **provenance(),
    }
    path = write_report(report, out / f"djo_{args.experiment}.json")
    for set_name, result in results.items():
        for name, row in result["differences"].items():
            cells = ", ".join(
                f"{m} {c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]" for m, c in row.items()
            )
            print(f"set {set_name}, {name}: {cells}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
