"""Chooses CycleRL's settings on the validation split, from a finished validation study's PMTP and DJO runs.

    python benchmarks/cyclerl_validation.py --from-study outputs/val --out-dir outputs/val_beta0.04 beta=0.04
    python benchmarks/cyclerl_validation.py --from-study outputs/val --out-dir outputs/val_steps240 max_steps=240

`--from-study` is a study run with `--split validation --stages cyclerl`. Its PMTP and every seed's DJO are linked
into `--out-dir` (hard links, nothing copied or changed), and so is each seed's SFT continued when no changed field
is one that control shares with CycleRL (steps, learning rate, schedule, data, LoRA, batch): then the control is
the same run. Everything else (CycleRL, shuffled reward, and SFT continued where it must follow the change) is
trained again under the study's own budget with the given CycleRL fields changed, for the study's seeds and world,
and scored on the same validation layouts (never the held-out ones). Writes `study_validation.json` and `.md`
there, with CycleRL - SFT continued's paired intervals, and the changes in `changes.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from echogen_rl.eval.evaluation import write_report
from echogen_rl.experiments.study import SFT_CONTROL_FIELDS, StudyBudget, run_study
from echogen_rl.experiments.study_report import format_results

# CycleRL fields its SFT continued control follows (`echogen_rl.experiments.study._cyclerl_arms`): changing one of
# them changes the control too, which is then trained again.
SFT_SHARED = {*SFT_CONTROL_FIELDS, "per_device_train_batch_size", "num_generations", "dataset"}


def parse_change(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a change is FIELD=VALUE (a CycleRL config field), got {text!r}")
    return name, yaml.safe_load(value)


def link_run(source: Path, target: Path) -> None:
    """Hard-links a finished run's folder (its `study_run.json` included) into the new study."""
    if not (source / "study_run.json").exists():
        raise FileNotFoundError(f"{source} is not a finished study run (no study_run.json): finish --from-study first")
    if target.exists():
        return
    shutil.copytree(source, target, copy_function=os.link)  # its validation scores too: the same layouts


def linked_runs(budget: StudyBudget, changes: dict) -> list[str]:
    """The runs the new study shares with its source: PMTP, each seed's DJO, and SFT continued unless a change
    reaches that control."""
    shared = ["pmtp_base", "pmtp"] + [f"seed{s}/djo" for s in range(budget.seeds)]
    if not SFT_SHARED & set(changes):
        shared += [f"seed{s}/sft_continued" for s in range(budget.seeds)]
    return shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-study", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("changes", type=parse_change, nargs="+", help="FIELD=VALUE, CycleRL config fields")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("echogen_rl").setLevel(logging.INFO)  # the study's progress, as `echogen-rl study` prints it
    source = args.from_study / "study_validation.json"
    if not source.exists():  # a held-out study is never a source: settings are chosen on validation only
        raise FileNotFoundError(f"{source} is missing: run `echogen-rl study --split validation` there first")
    report = json.loads(source.read_text())
    changes = dict(args.changes)
    budget = dict(report["budget"])
    budget["cyclerl"] = {**budget["cyclerl"], **changes}
    budget["stages"] = ("cyclerl",)
    budget = StudyBudget(**budget)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    shared = linked_runs(budget, changes)
    for name in shared:
        link_run(args.from_study / name, out / name)
    for name in ("cache", "tiny-janus"):
        if (args.from_study / name).exists() and not (out / name).exists():
            shutil.copytree(args.from_study / name, out / name, copy_function=os.link)
    result = run_study(out, budget, split="validation", workers=args.jobs, seed_set=report["seed_set"]["name"])
    changed = {"changes": changes, "from_study": args.from_study.as_posix(), "linked": shared}
    write_report(changed, out / "changes.json")
    print(format_results(result, out))


if __name__ == "__main__":
    main()
