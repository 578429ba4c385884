"""`echogen-rl demo`: the three stages end to end on the shapes world, offline on a CPU.

It builds the tiny checkpoint, trains PMTP (its two phases) -> DJO -> CycleRL by running the shipped shapes configs
through their recipes (`recipes/configs/<stage>/shapes_tiny.yaml`, and `pmtp/shapes_tiny_kinds.yaml`; a budget
changes only the fields it lists), evaluates after each stage on held-out layouts (the oracle detector reads the
generated code grids exactly), and trains a "separate" baseline with PMTP's steps (both phases): one model on L2I
only, another on I2L only, no joint packing. It writes `report.json` and a PNG grid per stage, and `echogen-rl demo` prints a table.
The numbers are whatever this budget gives; nothing is tuned to the held-out set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoTokenizer

from echogen_rl.data.shapes import ShapesConfig, build_shapes_dataset
from echogen_rl.data.splits import DEMO_HELD_OUT_SEED
from echogen_rl.eval.inference import evaluate_i2l, evaluate_l2i
from echogen_rl.eval.metrics import cycle_miou, mask_iou
from echogen_rl.eval.visualize import image_grid, overlay, save_png
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
from echogen_rl.layout import Layout
from echogen_rl.models.architectures import config_name
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.image_tokenizers import PaletteTokenizer
from echogen_rl.models.loading import load_trained
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.sampling import resolve_guidance_scale
from echogen_rl.models.tiny import build_tiny_checkpoint
from echogen_rl.scripts.runner import run_recipe

logger = logging.getLogger(__name__)


COLUMNS = (
    "ap",
    "ap50",
    "color",
    "tolerant_l2i",
    "cycle_miou_ref",
    "cycle_miou",
    "grounding_acc50",
    "grounding_miou",
)


@dataclass
class DemoBudget:
    """What the demo changes in the shipped shapes configs (`recipes/configs/<stage>/shapes_tiny.yaml`), per stage
    as `{field: value}`, and how many held-out layouts it scores.

    The default is for a few minutes on 2 cores, running side by side: PMTP and each separate baseline train 420
    steps (the config's 1000), DJO 100 (200) and CycleRL 40 (120). `DemoBudget.shipped()` changes nothing but where
    runs write; `DemoBudget.quick()` is the smoke-test budget.
    """

    eval_layouts: int = 64
    pmtp: dict = field(default_factory=lambda: {"max_steps": 420})
    pmtp_kinds: dict = field(default_factory=lambda: {"max_steps": 600})
    djo: dict = field(default_factory=lambda: {"max_steps": 100})
    cyclerl: dict = field(default_factory=lambda: {"max_steps": 40})

    @classmethod
    def shipped(cls) -> DemoBudget:
        return cls(pmtp={}, pmtp_kinds={}, djo={}, cyclerl={})

    @classmethod
    def quick(cls) -> DemoBudget:
        return cls(
            eval_layouts=8,
            pmtp={"max_steps": 4, "num_train_samples": 64},
            pmtp_kinds={"max_steps": 2, "num_train_samples": 32},
            djo={"max_steps": 3, "num_train_samples": 32, "warmup_steps": 1},
            cyclerl={"max_steps": 2, "num_train_samples": 8, "per_device_train_batch_size": 8, "num_generations": 4},
        )


def train_stage(config: str, out: str, changes: dict) -> list[dict]:
    """Runs a shipped shapes config (a stage, or `"<stage>/<name>"`, see [`shapes_config`]) through its stage's
    recipe with `changes` (a demo job); returns its log."""
    stage = config.split("/")[0]
    trainer = run_recipe(stage, shapes_config(config), {**changes, **run_settings(out)}, [FollowThreadShare()])
    return trainer.state.log_history


def evaluate_stage(out: str, stage: str, l2i: str, i2l: str, base: str | None, eval_layouts: int) -> dict:
    """Scores one stage on the held-out layouts (a demo job) and draws its picture (the untrained model gets none):
    L2I by the model at `l2i` (the oracle detector), grounding and the cycle's return trip by the one at `i2l`, and
    `cycle_miou_ref`, the return trip by PMTP's grounder, fixed for every stage."""
    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(out / "tiny-janus")
    shapes = ShapesConfig()
    layouts, real_codes = _held_out(eval_layouts, shapes)
    l2i_model = load_trained(l2i, base)[0]
    i2l_model = l2i_model if i2l == l2i else load_trained(i2l)[0]
    # Sampled as the checkpoint records (the shapes configs train no unconditional branch: no CFG).
    guidance = resolve_guidance_scale(l2i_model, None, "demo")
    l2i_result = evaluate_l2i(
        l2i_model, tokenizer, layouts, "oracle", shapes, guidance_scale=guidance, seed=0, batch_size=len(layouts)
    )
    i2l_result = evaluate_i2l(i2l_model, tokenizer, real_codes, layouts)
    codes, phrases = l2i_result["codes"], [lay.phrases for lay in layouts]
    prompts = PromptBuilder(tokenizer, real_codes.shape[1])
    recovered = l2i_result["recovered"]
    if i2l_model is not l2i_model:
        recovered = [g.layout for g in Grounder(i2l_model, prompts)(codes, phrases)]
    metrics = {k: l2i_result["metrics"].get(k) for k in ("ap", "ap50", "ap75", "spatial", "color")}
    metrics["tolerant_l2i"] = mask_iou(codes, layouts, shapes)
    metrics["cycle_miou"] = cycle_miou(recovered, layouts)
    metrics["grounding_acc50"] = i2l_result["acc50"]
    metrics["grounding_miou"] = i2l_result["miou"]
    metrics["grounding_parse_failure_rate"] = i2l_result["parse_failure_rate"]
    metrics["grounding_problem_rate"] = i2l_result["problem_rate"]
    # A stage cannot raise `cycle_miou_ref` by changing its own grounder.
    reference = Grounder(load_trained(out / "pmtp")[0], prompts)
    metrics["cycle_miou_ref"] = cycle_miou([g.layout for g in reference(codes, phrases)], layouts)
    if stage != "untrained":
        palette = PaletteTokenizer(shapes.grid_size, shapes.patch_size)
        _picture(stage, {"codes": codes, "recovered": recovered}, layouts, palette, out)
    return metrics


def _held_out(n: int, shapes: ShapesConfig) -> tuple[list[Layout], torch.Tensor]:
    held_out = build_shapes_dataset(n, seed=DEMO_HELD_OUT_SEED, config=shapes)
    layouts = [Layout.from_json(s) for s in held_out["layout"]]
    for layout, caption in zip(layouts, held_out["caption"]):
        layout.caption = caption
    return layouts, torch.tensor(held_out["image_codes"])


def _picture(stage: str, pictures: dict, layouts, palette: PaletteTokenizer, out: Path, n: int = 8) -> Path:
    images = palette.decode(pictures["codes"][:n])
    tiles = [overlay(im, lay, rec) for im, lay, rec in zip(images, layouts[:n], pictures["recovered"][:n])]
    titles = [" / ".join(lay.phrases) for lay in layouts[:n]]
    return save_png(image_grid(tiles, columns=4, titles=titles), out / "pictures" / f"{stage}.png")


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_stage_table(stages: dict[str, dict]) -> str:
    """The demo's table: one row per stage, the metrics of `COLUMNS`."""
    width = max(len(s) for s in stages)
    lines = [f"{'stage':<{width}}  " + "  ".join(f"{c:>15}" for c in COLUMNS)]
    for stage, metrics in stages.items():
        lines.append(f"{stage:<{width}}  " + "  ".join(f"{_fmt(metrics.get(c)):>15}" for c in COLUMNS))
    return "\n".join(lines)


def _last(history: list[dict], key: str):
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


def _data_picture(out: Path, eval_layouts: int, shapes: ShapesConfig) -> Path:
    """`data.png`: the first 8 held-out layouts drawn over their real images."""
    held_out = build_shapes_dataset(eval_layouts, seed=DEMO_HELD_OUT_SEED, config=shapes)
    layouts = [Layout.from_json(s) for s in held_out["layout"][:8]]
    return save_png(
        image_grid([overlay(im, lay) for im, lay in zip(held_out["image"][:8], layouts)], 4), out / "data.png"
    )


def _runs(out: Path, ckpt: Path, budget: DemoBudget) -> dict[str, tuple]:
    """The runs to train, as `{name: (config, see [`shapes_config`]; changes; the run it starts from)}`."""
    cache = {"cache_dir": str(out / "cache")}
    steps = {
        name: changes.get("max_steps", _config_value(name, "max_steps"))
        for name, changes in (("pmtp", budget.pmtp), (PMTP_KINDS_CONFIG, budget.pmtp_kinds))
    }
    # The baseline: L2I and I2L as two models, each with PMTP's steps (both phases), no joint packing.
    separate = {**budget.pmtp, "max_steps": sum(steps.values()), "model_name_or_path": str(ckpt), **cache}
    return {
        "pmtp_base": ("pmtp", {**budget.pmtp, "model_name_or_path": str(ckpt), **cache}, None),
        "pmtp": (
            PMTP_KINDS_CONFIG,
            {**budget.pmtp_kinds, "model_name_or_path": str(out / "pmtp_base"), **cache},
            "pmtp_base",
        ),
        "djo": ("djo", {**budget.djo, "model_name_or_path": str(out / "pmtp"), **cache}, "pmtp"),
        "cyclerl": ("cyclerl", {**budget.cyclerl, "model_name_or_path": str(out / "djo"), **cache}, "djo"),
        "separate-l2i": ("pmtp", {**separate, "text_loss_weight": 0.0}, None),
        "separate-i2l": ("pmtp", {**separate, "image_loss_weight": 0.0}, None),
    }


def _config_value(config: str, key: str):
    return yaml.safe_load(shapes_config(config).read_text())[key]


def _evaluations(out: Path, ckpt: Path) -> dict[str, tuple]:
    """The stages scored, as `{stage: (L2I model, I2L model, base of a LoRA adapter, trained runs it needs)}`."""
    return {
        "untrained": (ckpt, ckpt, None, ("pmtp",)),
        "pmtp": (out / "pmtp", out / "pmtp", None, ("pmtp",)),
        "djo": (out / "djo", out / "djo", None, ("pmtp", "djo")),
        "cyclerl": (out / "cyclerl", out / "cyclerl", out / "djo", ("pmtp", "cyclerl")),
        "separate": (out / "separate-l2i", out / "separate-i2l", None, ("pmtp", "separate-l2i", "separate-i2l")),
    }


def _jobs(out: Path, runs: dict[str, tuple], evaluations: dict[str, tuple], eval_layouts: int) -> list[Job]:
    """A training job per run, each after the run it starts from, then a scoring job per stage."""
    jobs = [
        Job(
            f"train {name}",
            train_stage,
            {"config": config, "out": str(out / name), "changes": changes},
            (f"train {after}",) if after else (),
            out / name / "train.log",
        )
        for name, (config, changes, after) in runs.items()
    ]
    for stage, (l2i, i2l, base, needs) in evaluations.items():
        kwargs = {
            "out": str(out),
            "stage": stage,
            "l2i": str(l2i),
            "i2l": str(i2l),
            "eval_layouts": eval_layouts,
        }
        kwargs["base"] = str(base) if base else None
        log = out / "logs" / f"score_{stage}.log"
        jobs.append(Job(f"score {stage}", evaluate_stage, kwargs, tuple(f"train {n}" for n in needs), log, light=True))
    return jobs


def _training(history: dict[str, list[dict]]) -> dict:
    """The report's `training`: the last logged losses and accuracies of each stage, CycleRL's rewards per log."""
    cyclerl_rewards = [h["rewards/cycle_iou/mean"] for h in history["cyclerl"] if "rewards/cycle_iou/mean" in h]
    return {
        "pmtp": {k: _last(history["pmtp"], k) for k in ("loss_img", "loss_text", "accuracy_img", "accuracy_text")},
        "djo": {k: _last(history["djo"], k) for k in ("loss_l2i", "loss_loop", "tau")},
        "cyclerl": {"cycle_iou_reward_per_log": cyclerl_rewards},
    }


def run_demo(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    budget: DemoBudget | None = None,
    workers: int | None = None,
) -> dict:
    """Runs the demo; writes `report.json`, `data.png` and `pictures/<stage>.png` to `output_dir`.

    The stages train in order, and the separate baseline beside them, `workers` runs at a time
    ([`echogen_rl.experiments.jobs.run_jobs`]; default one per core, at most 4); each stage is scored as soon as it has trained.
    Each run's output goes to a log in its folder. `echogen-rl demo` prints the table of the report's `stages`
    ([`format_stage_table`]).
    """
    budget = budget or DemoBudget()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(0)

    ckpt = build_tiny_checkpoint(out / "tiny-janus")
    _data_picture(out, budget.eval_layouts, ShapesConfig())
    runs = _runs(out, ckpt, budget)
    evaluations = _evaluations(out, ckpt)
    jobs = _jobs(out, runs, evaluations, budget.eval_layouts)
    logger.info("[demo] %s runs to train, %s stages to score; logs in each run's folder", len(runs), len(evaluations))
    done = run_jobs(jobs, workers, prefix="[demo]")
    stages = {stage: done[f"score {stage}"] for stage in evaluations}
    history = {name: done[f"train {name}"] for name in ("pmtp", "djo", "cyclerl")}

    report = {
        "stages": stages,
        "training": _training(history),
        "budget": asdict(budget),
        "configs": {
            **{stage: config_name(shapes_config(stage)) for stage in ("pmtp", "djo", "cyclerl")},
            "pmtp_kinds": config_name(shapes_config(PMTP_KINDS_CONFIG)),
        },
        "held_out_layouts": budget.eval_layouts,
        "workers": workers or default_workers(),
        "seconds": time.perf_counter() - start,
        "provenance": provenance(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
