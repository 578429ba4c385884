"""`echogen-rl study`: does each stage earn its place? Seeded runs of each stage against fair controls.

On the shapes world, from the shipped configs (`recipes/configs/<stage>/shapes_tiny.yaml`, run by their own
recipes; a budget changes only the fields it lists, and `study.json` records them):

- **PMTP** once, from the tiny checkpoint.
- Per training seed, from PMTP: **DJO**, and its control **PMTP continued**: the PMTP loss with DJO's restart
  (optimizer, learning rate and schedule), steps, batch and data.
- Per seed, from that seed's DJO: **CycleRL**, and two controls: **SFT continued** (the PMTP loss on the prompts'
  own layouts and images, with CycleRL's LoRA, learning rate, schedule and steps, and as many layouts a step as
  CycleRL has prompts) and **shuffled reward** (CycleRL with its rewards permuted within each batch,
  `echogen_rl.rewards.controls`).

Every model generates an image for each held-out layout twice, greedily and by T=1 sampling, and is scored per
layout (see [`echogen_rl.experiments.study_scoring.score_codes`]); paired differences over the same layouts and
seeds get bootstrap intervals ([`echogen_rl.experiments.study_statistics`]). Held-out layouts are never used to
choose a setting: `--split validation` scores a validation split instead, for that. The files a study writes and
the tables it prints are [`echogen_rl.experiments.study_report`]'s.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from echogen_rl.data.shapes import ShapesConfig
from echogen_rl.data.splits import SEED_SETS
from echogen_rl.eval.reward_check import REWARD_GROUNDERS, reward_gate, summarize_reward_check
from echogen_rl.experiments.jobs import (
    PMTP_KINDS_CONFIG,
    FollowThreadShare,
    Job,
    default_workers,
    run_jobs,
    run_settings,
    shapes_config,
)
from echogen_rl.experiments.provenance import provenance
from echogen_rl.experiments.study_report import write_study
from echogen_rl.experiments.study_scoring import has_scores, score_run, scores_path, study_layouts
from echogen_rl.experiments.study_statistics import AP_RESAMPLES, COMPARISONS, summarize
from echogen_rl.models.architectures import config_name
from echogen_rl.models.tiny import TinyJanusConfig, ensure_tiny_checkpoint
from echogen_rl.scripts.runner import run_recipe

logger = logging.getLogger(__name__)

ARMS = ("djo", "pmtp_continued", "cyclerl", "sft_continued", "cyclerl_shuffled")
# DJO's control, PMTP continued: PMTP's loss with everything DJO's run has (restart, steps, batch, data).
DJO_CONTROL_FIELDS = (
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "num_train_samples",
    "dataset_seed",
    "optim",
    "kind_negative_prob",  # PMTP's kind negatives (both halves) at DJO's rate: both keep the grounder seeing shape
    "color_negative_prob",  # and color
    "shuffle_grounding_queries",
)
STAGE_ARMS = {"djo": ("djo", "pmtp_continued"), "cyclerl": ("cyclerl", "sft_continued", "cyclerl_shuffled")}

# CycleRL's control, SFT continued: the PMTP loss with these of CycleRL's settings (steps, restart, data, LoRA).
SFT_CONTROL_FIELDS = (
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "num_train_samples",
    "dataset_seed",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
)


@dataclass
class StudyBudget:
    """What a study changes in the shipped shapes configs, per stage (`{field: value}`), and its sizes.

    `world` changes the shapes world for every run and for scoring (`grid_size`, `max_shapes`; a grid other than 8
    gets a tiny checkpoint of its own); `stages` names the stages compared with their controls (`djo`, `cyclerl`;
    CycleRL starts from DJO, which is always trained).
    """

    seeds: int = 3
    layouts: int = 512
    pmtp: dict = field(default_factory=dict)
    pmtp_kinds: dict = field(default_factory=dict)
    djo: dict = field(default_factory=dict)
    cyclerl: dict = field(default_factory=dict)
    n_resamples: int = 4000
    world: dict = field(default_factory=dict)
    stages: tuple[str, ...] = ("djo", "cyclerl")

    def __post_init__(self):
        unknown = set(self.world) - {"grid_size", "max_shapes"}
        if unknown:
            raise ValueError(f"StudyBudget.world: only grid_size and max_shapes can change, got {sorted(unknown)}")
        ShapesConfig(**self.world)  # a world that cannot be drawn fails here, before any run
        if not self.stages or set(self.stages) - set(STAGE_ARMS):
            raise ValueError(f"StudyBudget.stages: a non-empty subset of {tuple(STAGE_ARMS)}, got {self.stages}")

    def shapes(self) -> ShapesConfig:
        return ShapesConfig(**self.world)

    def arms(self) -> tuple[str, ...]:
        return tuple(arm for stage in STAGE_ARMS if stage in self.stages for arm in STAGE_ARMS[stage])

    def scored_arms(self) -> tuple[str, ...]:
        """The arms scored: those compared, and DJO wherever CycleRL is (its grounder gives CycleRL's rewards, and
        the reward gate checks it)."""
        arms = self.arms()
        return arms if "djo" in arms or "cyclerl" not in self.stages else ("djo", *arms)

    @classmethod
    def quick(cls) -> StudyBudget:
        """A pipeline check of a few steps per run (the tests use it)."""
        return cls(
            seeds=2,
            layouts=8,
            pmtp={"max_steps": 4, "num_train_samples": 32, "per_device_train_batch_size": 8},
            pmtp_kinds={"max_steps": 2, "num_train_samples": 32, "per_device_train_batch_size": 8},
            djo={"max_steps": 2, "num_train_samples": 16, "per_device_train_batch_size": 4, "warmup_steps": 1},
            cyclerl={"max_steps": 2, "num_train_samples": 8, "per_device_train_batch_size": 8, "num_generations": 4},
            n_resamples=200,
        )


def _values(stage: str, budget_fields: dict) -> dict:
    values = yaml.safe_load(shapes_config(stage).read_text())
    return {**values, **budget_fields}


def _run_settings(out: Path, seed: int) -> dict:
    return {**run_settings(out, seed), "disable_tqdm": True, "logging_steps": 10}


def train_run(stage: str, config_stage: str, out: str, settings: dict) -> dict:
    """Runs one recipe (a study job, see [`echogen_rl.experiments.jobs`]) and records it in `out/study_run.json`, written last:
    a folder holding it is a finished run that a resumed study keeps."""
    out = Path(out)
    for stale in out.glob("study_scores_*.json"):  # scores of an unfinished earlier run in this folder
        stale.unlink()
    clock = time.perf_counter()
    threads = FollowThreadShare()
    trainer = run_recipe(stage, shapes_config(config_stage), settings, [threads])
    history = trainer.state.log_history
    seconds = time.perf_counter() - clock
    record = {
        "stage": stage,
        "config": config_name(shapes_config(config_stage)),
        "settings": settings,
        "seconds": seconds,
    }
    record["threads"] = threads.threads  # the thread counts it ran on, in order
    record["log_history"] = history
    del trainer
    gc.collect()
    (out / "study_run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {"run": str(out), "seconds": seconds}


def _checked_budget(budget: StudyBudget | None, split: str, seeds: int | None, seed_set: str) -> StudyBudget:
    """The budget a study runs on (`seeds` replaces its seeds), once its split, seeds and seed set are valid."""
    budget = budget or StudyBudget()
    if seeds is not None:
        budget.seeds = seeds
    if split not in ("held_out", "validation"):
        raise ValueError(f"split must be 'held_out' or 'validation', got {split!r}")
    if budget.seeds < 2:
        raise ValueError(f"a study needs at least 2 training seeds, got {budget.seeds}")
    if seed_set not in SEED_SETS:
        raise ValueError(f"seed_set must be one of {sorted(SEED_SETS)}, got {seed_set!r}")
    return budget


def _djo_arms(out: Path, root: Path, seed: int, budget: StudyBudget, world: dict, djo_values: dict) -> dict:
    """One seed's DJO run and its control, PMTP continued, both from PMTP: `{arm: settings}`."""
    cache = str(out / "cache")
    djo = {
        **budget.djo,
        **world,
        "model_name_or_path": str(out / "pmtp"),
        "cache_dir": cache,
        **_run_settings(root / "djo", seed),
    }
    pmtp_cont = {k: djo_values[k] for k in DJO_CONTROL_FIELDS if k in djo_values}
    pmtp_cont.update(world)
    pmtp_cont.update(
        {
            "model_name_or_path": str(out / "pmtp"),
            "cache_dir": cache,
            **_run_settings(root / "pmtp_continued", seed),
        }
    )
    return {"djo": djo, "pmtp_continued": pmtp_cont}


def _cyclerl_arms(out: Path, root: Path, seed: int, budget: StudyBudget, world: dict, rl_values: dict) -> dict:
    """One seed's CycleRL run and its controls, shuffled reward and SFT continued, all from that seed's DJO:
    `{arm: settings}`."""
    cache = str(out / "cache")
    rl = {
        **budget.cyclerl,
        **world,
        "model_name_or_path": str(root / "djo"),
        "cache_dir": cache,
        **_run_settings(root / "cyclerl", seed),
    }
    shuffled = {
        **rl,
        "reward_funcs": [f"echogen_rl.rewards.controls:shuffled_{name}" for name in rl_values["reward_funcs"]],
        **_run_settings(root / "cyclerl_shuffled", seed),
    }
    # The SFT control: the prompts' own layouts with their images, CycleRL's LoRA and optimizer, one layout
    # per prompt of a CycleRL step.
    prompts_per_step = rl_values["per_device_train_batch_size"] // rl_values["num_generations"]
    sft = {k: rl_values[k] for k in SFT_CONTROL_FIELDS if k in rl_values}
    sft.update(
        {
            **world,
            "dataset": rl_values.get("dataset", "shapes"),
            "per_device_train_batch_size": prompts_per_step,
            "model_name_or_path": str(root / "djo"),
            "cache_dir": cache,
            **_run_settings(root / "sft_continued", seed),
        }
    )
    return {"cyclerl": rl, "cyclerl_shuffled": shuffled, "sft_continued": sft}


def _plan_runs(out: Path, budget: StudyBudget, world: dict, first: int) -> tuple[list[tuple], dict[str, dict]]:
    """The runs to train, as `(name, stage, config stage, settings, the run it starts from)`, listed in order of
    preference: the runs that others wait for, then the long ones; and the settings of each arm's runs, as
    `study.json` records them."""
    arms = budget.arms()
    # PMTP in two phases, as the shipped configs chain them: the study's `pmtp` is the second, every arm starts
    # from it and its grounder scores `cycle_miou_ref`.
    base_settings, pmtp_settings = (
        {**fields, **world, "model_name_or_path": str(out / start), "cache_dir": str(out / "cache")}
        | _run_settings(out / name, first)
        for name, start, fields in (("pmtp_base", "tiny-janus", budget.pmtp), ("pmtp", "pmtp_base", budget.pmtp_kinds))
    )
    djo_values = _values("djo", budget.djo)
    rl_values = _values("cyclerl", budget.cyclerl)
    settings: dict[str, dict] = {"pmtp_base": base_settings, "pmtp": pmtp_settings}
    runs = [
        ("pmtp_base", "pmtp", "pmtp", base_settings, None),
        ("pmtp", "pmtp", PMTP_KINDS_CONFIG, pmtp_settings, "pmtp_base"),
    ]
    later = []
    for s in range(budget.seeds):
        root, seed = out / f"seed{s}", first + s
        seed_arms = {
            **_djo_arms(out, root, seed, budget, world, djo_values),
            **_cyclerl_arms(out, root, seed, budget, world, rl_values),
        }
        runs.append((f"seed{s}/djo", "djo", "djo", seed_arms["djo"], "pmtp"))
        later += [
            (f"seed{s}/cyclerl", "cyclerl", "cyclerl", seed_arms["cyclerl"], f"seed{s}/djo"),
            (f"seed{s}/cyclerl_shuffled", "cyclerl", "cyclerl", seed_arms["cyclerl_shuffled"], f"seed{s}/djo"),
            (f"seed{s}/pmtp_continued", "pmtp", "pmtp", seed_arms["pmtp_continued"], "pmtp"),
            (f"seed{s}/sft_continued", "pmtp", "pmtp", seed_arms["sft_continued"], f"seed{s}/djo"),
        ]
        for arm in ARMS:
            if arm in arms:
                settings[f"{arm}/seed{s}"] = seed_arms[arm]
    runs += [run for run in later if run[0].rsplit("/", 1)[-1] in arms]
    return runs, settings


def _training_jobs(out: Path, runs: list[tuple]) -> list[Job]:
    """A job per run still to train; a run whose folder holds `study_run.json` is kept."""
    jobs = []
    for name, stage, config_stage, arm_settings, starts_from in runs:
        if (out / name / "study_run.json").exists():
            logger.info("[study] %s: done before, kept", name)
            continue
        # A run kept from an earlier invocation is no job to wait for.
        after = (
            (f"train {starts_from}",) if starts_from and not (out / starts_from / "study_run.json").exists() else ()
        )
        jobs.append(
            Job(
                f"train {name}",
                train_run,
                {"stage": stage, "config_stage": config_stage, "out": str(out / name), "settings": arm_settings},
                after,
                out / name / "train.log",
            )
        )
    return jobs


def _scored_runs(budget: StudyBudget) -> list[tuple[str, str | None]]:
    """Every run scored, as `(name, the base of its LoRA adapter)`: PMTP, then each seed's arms."""
    return [("pmtp", None)] + [
        (f"seed{s}/{arm}", f"seed{s}/djo") for s in range(budget.seeds) for arm in budget.scored_arms()
    ]


def _scoring_jobs(
    out: Path, scored: list[tuple], trained: set[str], budget: StudyBudget, split: str, seed_set: str
) -> list[Job]:
    """A job per run without scores on this split's layouts, after the training jobs it needs (in `trained`)."""
    jobs = []
    # Every run is scored on the same layouts; a run that grounds rewards also gets the reward check.
    for name, base in scored:
        arm = name.rsplit("/", 1)[-1]
        checks = arm in REWARD_GROUNDERS
        if has_scores(out / name, split, budget.layouts, checks):
            continue
        after = tuple(f"train {n}" for n in {name, "pmtp", base or "pmtp"} if f"train {n}" in trained)
        kwargs = {
            "path": str(out / name),
            "base": str(out / base) if base else None,
            "reference": str(out / "pmtp"),
            "split": split,
            "layouts": budget.layouts,
            "checks_rewards": checks,
            "world": budget.world,
            "seed_set": seed_set,
        }
        jobs.append(Job(f"score {name}", score_run, kwargs, after, out / name / f"score_{split}.log", light=True))
    return jobs


def _notes(budget: StudyBudget) -> dict:
    """What `study.json`'s numbers are, in words."""
    return {
        "T=1": "metrics without a suffix score T=1 samples; `_greedy` scores greedy decoding",
        "cycle_miou_ref": "the grounder of the PMTP checkpoint, fixed for every arm",
        "ap": "COCO AP of the oracle detector, per seed then averaged; its intervals resample seeds and layouts "
        f"{min(AP_RESAMPLES, budget.n_resamples)} times",
        "reward_check": "cycle IoU a grounder gives each layout drawn correctly, as filled boxes, as another kind "
        "in each box, in colors the layout does not name, and empty",
        "evidence": "false on a comparison whose CycleRL arm was rewarded by a grounder that failed the reward gate",
        "intervals": "95% percentile bootstrap over seeds and layouts, paired by seed and layout",
    }


def _assess(out: Path, scored: list[tuple], budget: StudyBudget, split: str, seed_set: str, workers) -> dict:
    """The scores of every run summarized ([`summarize`]) with the reward check and gate, and the layouts scored:
    the study's results. CycleRL's comparisons are marked as no evidence when the reward gate fails."""
    targets, _ = study_layouts(split, budget.layouts, budget.shapes(), seed_set)
    evals: dict[str, list[dict]] = {"pmtp": [], **{a: [] for a in budget.scored_arms()}}
    for name, _ in scored:
        evals[name.rsplit("/", 1)[-1]].append(json.loads(scores_path(out / name, split).read_text()))

    summary = summarize(evals, targets, budget, workers)
    checks = summarize_reward_check(evals, budget.n_resamples)
    gate = reward_gate(checks.get("djo", {}))
    for name, comparison in summary["comparisons"].items():
        # A CycleRL arm trained on a reward that cannot tell a drawing from a painted box is no evidence.
        comparison["evidence"] = gate["passed"] or "cyclerl" not in COMPARISONS[name]
    return {
        **summary,
        "reward_check": checks,
        "reward_gate": {**gate, "grounder": "djo"},
        "seed_set": {"name": seed_set, **SEED_SETS[seed_set]},
        "split": split,
        "layouts": len(targets),
    }


def run_study(
    output_dir: str | os.PathLike,
    budget: StudyBudget | None = None,
    split: str = "held_out",
    seeds: int | None = None,
    workers: int | None = None,
    seed_set: str = "a",
) -> dict:
    """Trains and scores every arm (see the module docstring); writes `study.json` and `study.png`
    (`study_validation.*` for the validation split).

    `seed_set` (`SEED_SETS`) picks the training seeds and held-out layouts: `"b"` replicates `"a"` on seeds and
    layouts disjoint from it. CycleRL's comparisons are marked as no evidence when its reward grounder fails the
    reward gate ([`reward_gate`]).

    Runs go side by side, `workers` at a time ([`echogen_rl.experiments.jobs.run_jobs`]; default one per core, at most 4),
    each as soon as the run it starts from has ended; each run's output goes to `train.log` in its folder. A run
    whose folder holds `study_run.json` is kept, so a stopped study resumes where it stopped.
    """
    budget = _checked_budget(budget, split, seeds, seed_set)
    first = SEED_SETS[seed_set]["first_seed"]
    out = Path(output_dir)
    kept = out / "pmtp" / "study_run.json"
    if kept.exists() and json.loads(kept.read_text())["settings"].get("seed") != first:
        raise ValueError(f"{out} holds another seed set's runs (PMTP's seed is not {first}); use another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shapes = budget.shapes()
    # Every run draws the study's world; one of another grid starts from a tiny checkpoint of that grid.
    world = {"shapes_grid_size": shapes.grid_size, "shapes_max_shapes": shapes.max_shapes} if budget.world else {}
    if shapes.grid_size != ShapesConfig().grid_size:
        ensure_tiny_checkpoint(
            out / "tiny-janus", TinyJanusConfig(grid_size=shapes.grid_size, patch_size=shapes.patch_size)
        )
    runs, settings = _plan_runs(out, budget, world, first)

    jobs = _training_jobs(out, runs)
    trained = {j.name for j in jobs}
    scored = _scored_runs(budget)
    jobs += _scoring_jobs(out, scored, trained, budget, split, seed_set)
    logger.info(
        "[study] %s runs to train, %s to score on %s %s layouts (greedy and T=1); logs in each run's folder",
        len(trained),
        len(jobs) - len(trained),
        budget.layouts,
        split,
    )
    run_jobs(jobs, workers, prefix="[study]")

    report = {
        **_assess(out, scored, budget, split, seed_set, workers),
        "seeds": budget.seeds,
        "budget": asdict(budget),
        "settings": settings,
        "configs": {
            **{stage: config_name(shapes_config(stage)) for stage in ("pmtp", "djo", "cyclerl")},
            "pmtp_kinds": config_name(shapes_config(PMTP_KINDS_CONFIG)),
        },
        "provenance": provenance(),
        "world": asdict(shapes),
        "training_seconds": {
            name: json.loads((out / name / "study_run.json").read_text())["seconds"] for name, *_ in runs
        },
        "workers": workers or default_workers(),
        "seconds": time.perf_counter() - start,
        "seconds_note": "this invocation's wall time: runs kept from an earlier one are not in it",
        "notes": _notes(budget),
    }
    write_study(report, out)
    return report
