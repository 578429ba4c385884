"""Chooses PMTP's `kind_negative_prob` on the validation split: does the grounder, and so the cycle reward, see shape?

    python benchmarks/reward_grounder_validation.py --out-dir outputs/kind_negatives 0 0.3 0.6
    python benchmarks/reward_grounder_validation.py --out-dir outputs/kind_negatives --curriculum 1500 5e-4 0 0.3
    python benchmarks/reward_grounder_validation.py --out-dir outputs/kind_negatives \
        --djo-from curriculum_kind0.3_steps3000_lr0.0005 0 0.3

Trains the shipped shapes PMTP config once per value (seed 0, or each of `--seeds`; everything else as the study runs
it; the runs go side by side, one per core). With `--curriculum STEPS LR`, each value is instead a second phase: the
shipped PMTP (`kind_negative_prob` 0, trained first if missing) continued for STEPS steps at learning rate LR (cosine,
no warm-up) with that value; with `--from RUN` as well, RUN in `--out-dir` is continued instead (`RUN_then_kindP`).
With `--djo-from RUN`, each value is the shipped DJO's `kind_negative_prob`, trained from that run in `--out-dir`.
With `--score RUN...` instead of values, finished runs (a study's `pmtp`, say) are scored as they are, under their
folder names.
Then it scores each model on the validation layouts (never the held-out ones): the reward check
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
import yaml
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


def ran_with(run: Path) -> dict:
    """The settings a run trained with (its `study_run.json`), its start named by folder, not by this machine's path."""
    record = json.loads((run / "study_run.json").read_text())
    # The values of the config it ran (a repository path), under the settings that changed them.
    settings = {**yaml.safe_load(Path(record["config"]).read_text()), **record["settings"]}
    kept = (
        "kind_negative_prob",
        "max_steps",
        "learning_rate",
        "warmup_steps",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "seed",
    )
    return {
        "stage": record["stage"],
        "starts_from": Path(settings["model_name_or_path"]).name,
        **{k: settings[k] for k in kept if k in settings},
    }


def _job(name: str, run: Path, settings: dict, stage: str = "pmtp", seed: int = 0) -> Job:
    settings = {**settings, "cache_dir": str(run.parent / "cache"), **_run_settings(run, seed)}
    return Job(
        name,
        train_run,
        {"stage": stage, "config_stage": stage, "out": str(run), "settings": settings},
        log=run / "train.log",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--layouts", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="PMTP steps (default: the config's)")
    parser.add_argument("--curriculum", nargs=2, metavar=("STEPS", "LR"), help="a second phase from the shipped PMTP")
    parser.add_argument("--from", dest="start", help="with --curriculum: continue this run in --out-dir instead")
    parser.add_argument("--djo-from", help="train the shipped DJO from this run in --out-dir, per value and seed")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds (run folders of seeds other than 0 end in _seedS)",
    )
    parser.add_argument(
        "--score",
        type=Path,
        nargs="+",
        metavar="RUN",
        help="score these finished runs as they are (folders holding study_run.json, e.g. a study's pmtp), no values",
    )
    parser.add_argument("probs", type=float, nargs="*")
    args = parser.parse_args()
    if bool(args.score) == bool(args.probs):
        parser.error("give kind_negative_prob values to train, or --score RUN... to score finished runs")
    out = args.out_dir
    tiny = out / "tiny-janus"
    ensure_tiny_checkpoint(tiny)
    first = {"model_name_or_path": str(tiny), **({"max_steps": args.max_steps} if args.max_steps else {})}
    stage = "pmtp"
    runs, settings, seeds, firsts = {}, {}, {}, []
    for seed in args.seeds:
        suffix = f"_seed{seed}" if seed else ""
        if args.djo_from:
            stage, start = "djo", out / (args.djo_from + suffix)
            named = {f"{p:g}{suffix}": (out / f"djo_kind{p:g}_from_{args.djo_from}{suffix}", p) for p in args.probs}
            base = {"model_name_or_path": str(start)}
        elif args.curriculum:
            steps, lr = int(args.curriculum[0]), float(args.curriculum[1])
            start = out / f"{args.start or 'pmtp_kind0'}{suffix}"
            if not args.start and not (start / "study_run.json").exists():
                firsts.append(
                    _job(
                        f"train the shipped PMTP (seed {seed})", start, {**first, "kind_negative_prob": 0.0}, seed=seed
                    )
                )
            stem = f"{args.start}_then_kind" if args.start else "curriculum_kind"
            tail = "" if args.start else f"_steps{steps}_lr{lr:g}"
            named = {f"{p:g}{suffix}": (out / f"{stem}{p:g}{tail}{suffix}", p) for p in args.probs}
            base = {"model_name_or_path": str(start), "max_steps": steps, "learning_rate": lr, "warmup_steps": 0}
        else:
            named = {f"{p:g}{suffix}": (out / f"pmtp_kind{p:g}{suffix}", p) for p in args.probs}
            base = first
        for key, (run, p) in named.items():
            runs[key], settings[key], seeds[key] = run, {**base, "kind_negative_prob": p}, seed
    for run in args.score or ():
        if not (run / "study_run.json").is_file():
            parser.error(f"--score {run}: no study_run.json there (not a finished run)")
        runs[run.name] = run
    run_jobs(firsts, args.jobs, prefix="[validation]")
    jobs = [
        _job(f"train kind_negative_prob={key}", run, settings[key], stage, seeds[key])
        for key, run in runs.items()
        if not (run / "study_run.json").exists()
    ]
    run_jobs(jobs, args.jobs, prefix="[validation]")

    config = ShapesConfig()
    targets, real_codes = study_layouts("validation", args.layouts, config)
    rows = {}
    for p, run in runs.items():
        key = p if not (args.curriculum or args.djo_from or args.score) else run.name
        model, tokenizer = load_trained(run)
        result = evaluate_model(model, tokenizer, model, targets, real_codes, config)
        grounder = Grounder(model, PromptBuilder(tokenizer, real_codes.shape[1]), SCORING_BATCH)
        result["reward_check"] = reward_check(grounder, targets, config)
        check = summarize_reward_check({"pmtp": [result]}, 2000)["pmtp"]
        rows[key] = {
            "settings": ran_with(run),
            "reward_check": check,
            "gate": reward_gate(check),
            "l2i_and_grounding": l2i_row(result, targets),
        }
        means = ", ".join(f"{d} {check[d]['mean']:.3f}" for d in ("correct", "filled", "other_kind", "empty"))
        print(f"{key}: {means}; {rows[key]['l2i_and_grounding']}", flush=True)
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
        "seeds": sorted({row["settings"].get("seed", 0) for row in rows.values() if row.get("settings")}),
        "config": "recipes/configs/pmtp/shapes_tiny.yaml",
        "runs": rows,
        **provenance(),
    }
    print(f"wrote {write_report(report, out / 'kind_negatives_validation.json')}")


if __name__ == "__main__":
    main()
