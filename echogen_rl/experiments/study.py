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
layout (see [`score_codes`]); paired differences over the same layouts and seeds get bootstrap intervals
([`echogen_rl.eval.stats`]). Held-out layouts are never used to choose a setting: `--split validation` scores a
validation split instead, for that.
"""

from __future__ import annotations

import gc
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from echogen_rl.data.shapes import (
    ShapesConfig,
    build_shapes_dataset,
    detect_from_codes,
)
from echogen_rl.eval.coco_ap import ResampledAP
from echogen_rl.eval.evaluation import (
    color_accuracy,
    cycle_iou_per_image,
    generate_images,
    grounding_accuracy,
    mask_iou_per_image,
    strict_recall50,
    write_report,
)
from echogen_rl.eval.reward_check import DRAWINGS, REWARD_GROUNDERS, reward_check, reward_gate, summarize_reward_check
from echogen_rl.eval.stats import bootstrap_ci, paired_difference
from echogen_rl.experiments.jobs import FollowThreadShare, Job, default_workers, run_jobs, run_settings
from echogen_rl.experiments.provenance import provenance
from echogen_rl.experiments.study_report import (
    format_arms,
    format_comparisons,
    format_markdown,
    plot_differences,
    plot_study,
)
from echogen_rl.layout import Layout
from echogen_rl.models.architectures import SHIPPED_CONFIGS, config_name
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.loading import load_janus
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.tiny import TinyJanusConfig, ensure_tiny_checkpoint
from echogen_rl.scripts.runner import run_recipe

VALIDATION_SEED = 4_000_037
HELD_OUT_SEED = 5_000_011  # far from every training seed and from the recipes' eval split (+1_000_003)
# Replication: each set trains on its own seeds (PMTP on the first) and scores its own held-out layouts. A claim
# stands only when it holds on both; settings are chosen on the validation split, which no set scores.
SEED_SETS = {
    "a": {"first_seed": 0, "held_out_seed": HELD_OUT_SEED},
    "b": {"first_seed": 100, "held_out_seed": 6_000_023},
}
ARMS = ("djo", "pmtp_continued", "cyclerl", "sft_continued", "cyclerl_shuffled")
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
MODES = {"": 1.0, "_greedy": 0.0}  # metric suffix -> sampling temperature
AP_RESAMPLES = 1000
# Layouts generated and grounded together when scoring: decoding steps cost mostly per-call overhead at this size
# (`benchmarks/scoring_batch.py`: 1.15x faster generation and 1.07x faster grounding than 64, the same greedy codes and
# groundings; T=1 samples depend on the batch size, see `generate_images`).
SCORING_BATCH = 256


STAGE_ARMS = {"djo": ("djo", "pmtp_continued"), "cyclerl": ("cyclerl", "sft_continued", "cyclerl_shuffled")}


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

    @classmethod
    def quick(cls) -> StudyBudget:
        """A pipeline check of a few steps per run (the tests use it)."""
        return cls(
            seeds=2,
            layouts=8,
            pmtp={"max_steps": 4, "num_train_samples": 32, "per_device_train_batch_size": 8},
            djo={"max_steps": 2, "num_train_samples": 16, "per_device_train_batch_size": 4, "warmup_steps": 1},
            cyclerl={"max_steps": 2, "num_train_samples": 8, "per_device_train_batch_size": 8, "num_generations": 4},
            n_resamples=200,
        )


def _config(stage: str) -> Path:
    return SHIPPED_CONFIGS / stage / "shapes_tiny.yaml"


def _values(stage: str, budget_fields: dict) -> dict:
    values = yaml.safe_load(_config(stage).read_text())
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
    trainer = run_recipe(stage, _config(config_stage), settings, [threads])
    history = trainer.state.log_history
    seconds = time.perf_counter() - clock
    record = {"stage": stage, "config": config_name(_config(config_stage)), "settings": settings, "seconds": seconds}
    record["threads"] = threads.threads  # the thread counts it ran on, in order
    record["log_history"] = history
    del trainer
    gc.collect()
    (out / "study_run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {"run": str(out), "seconds": seconds}


def load_trained(path: Path, base: Path | None = None):
    """A study run's model: a full checkpoint, or `base` with the run's LoRA adapter merged in."""
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        model, tokenizer = load_janus(str(base))
        return PeftModel.from_pretrained(model, str(path)).merge_and_unload().eval(), tokenizer
    model, tokenizer = load_janus(str(path))
    return model.eval(), tokenizer


def color_per_layout(codes: torch.Tensor, targets: Sequence[Layout], config: ShapesConfig) -> list[float | None]:
    """Per layout, the share of entities whose box's dominant color is the phrase's (see `color_accuracy`)."""
    return [color_accuracy(codes[i : i + 1], [t], config) for i, t in enumerate(targets)]


def score_codes(codes, targets, policy_grounder, reference_grounder, config: ShapesConfig) -> dict:
    """Per-layout scores of generated images, and their oracle detections (for AP).

    - `cycle_miou_ref`: mean IoU of the layout's boxes with those a fixed grounder (PMTP's) recovers from the image;
      `cycle_miou_policy`: the same with the scored model's own grounder.
    - `tolerant_l2i`: [`mask_iou_per_image`]; `strict50`: [`strict_recall50`]; `color`: the dominant color per box.
    """
    phrases = [t.phrases for t in targets]
    detections = [detect_from_codes(row, config) for row in codes.tolist()]
    reference = cycle_iou_per_image([g.layout for g in reference_grounder(codes, phrases)], targets)
    if policy_grounder.model is reference_grounder.model:  # the reference scored as an arm: the same grounding
        policy = reference
    else:
        policy = cycle_iou_per_image([g.layout for g in policy_grounder(codes, phrases)], targets)
    return {
        "scores": {
            "cycle_miou_ref": reference,
            "cycle_miou_policy": policy,
            "tolerant_l2i": mask_iou_per_image(codes, targets, config),
            "strict50": strict_recall50(detections, targets),
            "color": color_per_layout(codes, targets, config),
        },
        "detections": [d.to_dict() for d in detections],
    }


def evaluate_model(model, tokenizer, reference, targets, real_codes, config: ShapesConfig) -> dict:
    """Scores one model per layout in both sampling modes, plus its grounding of the real images."""
    prompts = PromptBuilder(tokenizer, real_codes.shape[1])
    policy_grounder = Grounder(model, prompts, SCORING_BATCH)
    reference_grounder = Grounder(reference, prompts, SCORING_BATCH)
    result = {}
    for suffix, temperature in MODES.items():
        codes = generate_images(
            model, tokenizer, targets, guidance_scale=1.0, temperature=temperature, seed=0, batch_size=SCORING_BATCH
        )
        scored = score_codes(codes, targets, policy_grounder, reference_grounder, config)
        result[suffix or "_t1"] = {**scored, "codes": codes.tolist()}
    grounded = [g.layout for g in policy_grounder(real_codes, [t.phrases for t in targets])]
    result["grounding_miou"] = cycle_iou_per_image(grounded, targets)
    result["grounding"] = grounding_accuracy(grounded, targets)
    return result


def study_layouts(
    split: str, layouts: int, config: ShapesConfig, seed_set: str = "a"
) -> tuple[list[Layout], torch.Tensor]:
    """The layouts a study scores (with their captions) and their real images' codes: the seed set's held-out
    layouts, or the validation layouts (one split for every set)."""
    seed = SEED_SETS[seed_set]["held_out_seed"] if split == "held_out" else VALIDATION_SEED
    data = build_shapes_dataset(layouts, seed=seed, config=config)
    targets = [Layout.from_json(t) for t in data["layout"]]
    for t, caption in zip(targets, data["caption"]):
        t.caption = caption
    return targets, torch.tensor(data["image_codes"])


def scores_path(path: Path, split: str) -> Path:
    return Path(path) / f"study_scores_{split}.json"


def has_scores(path: Path, split: str, layouts: int, checks_rewards: bool) -> bool:
    """Whether `path` holds scores of this split's `layouts` (a study rerun with more layouts rescores)."""
    file = scores_path(path, split)
    if not file.exists():
        return False
    result = json.loads(file.read_text())
    return len(result.get("grounding_miou", ())) == layouts and (not checks_rewards or "reward_check" in result)


def score_run(
    path: str,
    base: str | None,
    reference: str,
    split: str,
    layouts: int,
    checks_rewards: bool,
    world: dict,
    seed_set: str = "a",
) -> float:
    """Scores one trained run (a study job): [`evaluate_model`] against the `reference` grounder, plus
    [`reward_check`] for the grounders that give rewards; writes `study_scores_<split>.json`; returns seconds."""
    clock = time.perf_counter()
    config = ShapesConfig(**world)
    targets, real_codes = study_layouts(split, layouts, config, seed_set)
    model, tokenizer = load_trained(Path(path), Path(base) if base else None)
    same = Path(path).resolve() == Path(reference).resolve()
    reference_model = model if same else load_trained(Path(reference))[0]
    result = evaluate_model(model, tokenizer, reference_model, targets, real_codes, config)
    if checks_rewards:
        grounder = Grounder(model, PromptBuilder(tokenizer, real_codes.shape[1]), SCORING_BATCH)
        result["reward_check"] = reward_check(grounder, targets, config)
    write_report(result, scores_path(Path(path), split))
    return time.perf_counter() - clock


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
    budget = budget or StudyBudget()
    if seeds is not None:
        budget.seeds = seeds
    if split not in ("held_out", "validation"):
        raise ValueError(f"split must be 'held_out' or 'validation', got {split!r}")
    if budget.seeds < 2:
        raise ValueError(f"a study needs at least 2 training seeds, got {budget.seeds}")
    if seed_set not in SEED_SETS:
        raise ValueError(f"seed_set must be one of {sorted(SEED_SETS)}, got {seed_set!r}")
    first = SEED_SETS[seed_set]["first_seed"]
    out = Path(output_dir)
    kept = out / "pmtp" / "study_run.json"
    if kept.exists() and json.loads(kept.read_text())["settings"].get("seed") != first:
        raise ValueError(f"{out} holds another seed set's runs (PMTP's seed is not {first}); use another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cache = str(out / "cache")
    tiny = out / "tiny-janus"
    shapes = budget.shapes()
    # Every run draws the study's world; one of another grid starts from a tiny checkpoint of that grid.
    world = {"shapes_grid_size": shapes.grid_size, "shapes_max_shapes": shapes.max_shapes} if budget.world else {}
    if shapes.grid_size != ShapesConfig().grid_size:
        ensure_tiny_checkpoint(tiny, TinyJanusConfig(grid_size=shapes.grid_size, patch_size=shapes.patch_size))
    arms = budget.arms()

    pmtp_settings = {
        **budget.pmtp,
        **world,
        "model_name_or_path": str(tiny),
        "cache_dir": cache,
        **_run_settings(out / "pmtp", first),
    }
    djo_values = _values("djo", budget.djo)
    rl_values = _values("cyclerl", budget.cyclerl)
    settings: dict[str, dict] = {"pmtp": pmtp_settings}
    # (name, stage, config stage, settings, the run it starts from); listed in order of preference: the runs
    # that others wait for, then the long ones.
    runs = [("pmtp", "pmtp", "pmtp", pmtp_settings, None)]
    later = []
    for s in range(budget.seeds):
        root, seed = out / f"seed{s}", first + s
        djo = {
            **budget.djo,
            **world,
            "model_name_or_path": str(out / "pmtp"),
            "cache_dir": cache,
            **_run_settings(root / "djo", seed),
        }
        # The control: PMTP's loss with everything DJO's run has (restart, steps, batch, data).
        shared = (
            "max_steps",
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "weight_decay",
            "per_device_train_batch_size",
            "num_train_samples",
            "dataset_seed",
            "optim",
        )
        pmtp_cont = {k: djo_values[k] for k in shared if k in djo_values}
        pmtp_cont.update(world)
        pmtp_cont.update(
            {
                "model_name_or_path": str(out / "pmtp"),
                "cache_dir": cache,
                **_run_settings(root / "pmtp_continued", seed),
            }
        )
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
        sft = {
            k: rl_values[k]
            for k in (
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
            if k in rl_values
        }
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
        runs.append((f"seed{s}/djo", "djo", "djo", djo, "pmtp"))
        later += [
            (f"seed{s}/cyclerl", "cyclerl", "cyclerl", rl, f"seed{s}/djo"),
            (f"seed{s}/cyclerl_shuffled", "cyclerl", "cyclerl", shuffled, f"seed{s}/djo"),
            (f"seed{s}/pmtp_continued", "pmtp", "pmtp", pmtp_cont, "pmtp"),
            (f"seed{s}/sft_continued", "pmtp", "pmtp", sft, f"seed{s}/djo"),
        ]
        for arm, arm_settings in (
            ("djo", djo),
            ("pmtp_continued", pmtp_cont),
            ("cyclerl", rl),
            ("sft_continued", sft),
            ("cyclerl_shuffled", shuffled),
        ):
            if arm in arms:
                settings[f"{arm}/seed{s}"] = arm_settings
    runs += [run for run in later if run[0].rsplit("/", 1)[-1] in arms]

    jobs = []
    for name, stage, config_stage, arm_settings, starts_from in runs:
        if (out / name / "study_run.json").exists():
            print(f"[study] {name}: done before, kept", flush=True)
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
    trained = {j.name for j in jobs}
    # Every run is scored on the same layouts; a run that grounds rewards also gets the reward check.
    scored = [("pmtp", None)] + [(f"seed{s}/{arm}", f"seed{s}/djo") for s in range(budget.seeds) for arm in arms]
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
    print(
        f"[study] {len(trained)} runs to train, {len(jobs) - len(trained)} to score on {budget.layouts} {split} "
        f"layouts (greedy and T=1); logs in each run's folder",
        flush=True,
    )
    run_jobs(jobs, workers, prefix="[study]")

    targets, _ = study_layouts(split, budget.layouts, shapes, seed_set)
    evals: dict[str, list[dict]] = {"pmtp": [], **{a: [] for a in arms}}
    for name, _ in scored:
        evals[name.rsplit("/", 1)[-1]].append(json.loads(scores_path(out / name, split).read_text()))

    summary = summarize(evals, targets, budget, workers)
    checks = summarize_reward_check(evals, budget.n_resamples)
    gate = reward_gate(checks.get("djo", {}))
    for name, comparison in summary["comparisons"].items():
        # A CycleRL arm trained on a reward that cannot tell a drawing from a painted box is no evidence.
        comparison["evidence"] = gate["passed"] or "cyclerl" not in COMPARISONS[name]
    report = {
        **summary,
        "reward_check": checks,
        "reward_gate": {**gate, "grounder": "djo"},
        "seed_set": {"name": seed_set, **SEED_SETS[seed_set]},
        "split": split,
        "layouts": len(targets),
        "seeds": budget.seeds,
        "budget": asdict(budget),
        "settings": settings,
        "configs": {stage: config_name(_config(stage)) for stage in ("pmtp", "djo", "cyclerl")},
        "provenance": provenance(),
        "world": asdict(shapes),
        "training_seconds": {
            name: json.loads((out / name / "study_run.json").read_text())["seconds"] for name, *_ in runs
        },
        "workers": workers or default_workers(),
        "seconds": time.perf_counter() - start,
        "seconds_note": "this invocation's wall time: runs kept from an earlier one are not in it",
        "notes": {
            "T=1": "metrics without a suffix score T=1 samples; `_greedy` scores greedy decoding",
            "cycle_miou_ref": "the grounder of the PMTP checkpoint, fixed for every arm",
            "ap": "COCO AP of the oracle detector, per seed then averaged; its intervals resample seeds and layouts "
            f"{min(AP_RESAMPLES, budget.n_resamples)} times",
            "reward_check": "cycle IoU a grounder gives each layout drawn correctly, as filled boxes, as another kind "
            "in each box, and empty",
            "evidence": "false on a comparison whose CycleRL arm was rewarded by a grounder that failed the reward gate",
            "intervals": "95% percentile bootstrap over seeds and layouts, paired by seed and layout",
        },
    }
    # A validation study beside a held-out one writes files of its own, never over the other's.
    name = "study" if split == "held_out" else f"study_{split}"
    write_report(report, out / f"{name}.json")
    plot_study(summary, out / f"{name}.png")
    plot_differences(summary, out / f"{name}_differences.png")
    markdown = out / f".{name}.md.tmp"  # renamed into place, as `write_report` does: never half-written
    markdown.write_text(format_markdown(report))
    markdown.replace(out / f"{name}.md")
    print(format_arms(summary))
    print(format_comparisons(summary))
    for arm, check in report["reward_check"].items():
        cells = ", ".join(f"{d} {check[d]['mean']:.3f}" for d in DRAWINGS if d in check)
        print(f"reward check, {arm} grounder's cycle IoU: {cells}")
    if not gate["passed"]:
        print(f"reward gate failed ({'; '.join(gate['reasons'])}): CycleRL's comparisons are marked as no evidence")
    print(f"study: {out / f'{name}.json'}, {out / f'{name}.png'}; {report['seconds']:.0f} s")
    return report
