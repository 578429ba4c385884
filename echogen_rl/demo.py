"""`echogen-rl demo`: the three stages end to end on the shapes world, offline on a CPU.

It builds the tiny checkpoint, trains PMTP -> DJO -> CycleRL by running the shipped shapes configs through
their recipes (`recipes/configs/<stage>/shapes_tiny.yaml`; a budget changes only the fields it lists),
evaluates after each stage on held-out layouts (the oracle detector reads the generated code grids
exactly), and trains a "separate" baseline with the PMTP config's steps: one model on L2I only, another on
I2L only, no joint packing. It prints a table and writes `report.json` and a PNG grid per stage.
The numbers are whatever this budget gives; nothing is tuned to the held-out set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, JanusForConditionalGeneration

from .architectures import SHIPPED_CONFIGS
from .data.shapes import ShapesConfig, build_shapes_dataset
from .evaluation import cycle_miou, evaluate_i2l, evaluate_l2i, mask_iou
from .grounding import Grounder
from .image_tokenizers import PaletteTokenizer
from .layout import Layout
from .prompts import PromptBuilder
from .recipe_runner import run_recipe, run_settings
from .sampling import resolve_guidance_scale
from .tiny import build_tiny_checkpoint
from .visualize import image_grid, overlay, save_png

HELD_OUT_SEED = 3_000_017  # far from the training seeds (0) and the eval split (1_000_003)
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

    The default fits the demo in about 10 minutes on 2 cores: PMTP and the separate baselines train half the shipped
    steps (500), CycleRL half its steps (60); DJO runs as shipped. `DemoBudget.shipped()` changes nothing but where
    runs write (about 25 minutes); `DemoBudget.quick()` is the smoke-test budget.
    """

    eval_layouts: int = 64
    pmtp: dict = field(default_factory=lambda: {"max_steps": 500})
    djo: dict = field(default_factory=dict)
    cyclerl: dict = field(default_factory=lambda: {"max_steps": 60})

    @classmethod
    def shipped(cls) -> DemoBudget:
        return cls(pmtp={}, djo={}, cyclerl={})

    @classmethod
    def quick(cls) -> DemoBudget:
        return cls(
            eval_layouts=8,
            pmtp={"max_steps": 4, "num_train_samples": 64},
            djo={"max_steps": 3, "num_train_samples": 32, "warmup_steps": 1},
            cyclerl={"max_steps": 2, "num_train_samples": 8, "per_device_train_batch_size": 8, "num_generations": 4},
        )


def _shipped(stage: str) -> Path:
    return SHIPPED_CONFIGS / stage / "shapes_tiny.yaml"


def _train(stage: str, out: Path, changes: dict, **extra) -> tuple:
    """Runs the stage's shipped shapes config through its recipe with `changes`; returns the model and its log."""
    trainer = run_recipe(stage, _shipped(stage), {**changes, **extra, **run_settings(out)})
    return trainer.model, trainer.state.log_history


def _evaluate(l2i_model, i2l_model, tokenizer, layouts, real_codes, shapes) -> tuple[dict, dict]:
    """Stage metrics: L2I by `l2i_model` (oracle detector), grounding and the cycle's return trip by `i2l_model`."""
    # Sampled as the checkpoint records (the shapes configs train no unconditional branch: no CFG).
    guidance = resolve_guidance_scale(l2i_model, None, "demo")
    l2i = evaluate_l2i(l2i_model, tokenizer, layouts, "oracle", shapes, guidance_scale=guidance, seed=0)
    i2l = evaluate_i2l(i2l_model, tokenizer, real_codes, layouts)
    recovered = l2i["recovered"]
    if i2l_model is not l2i_model:
        prompts = PromptBuilder(tokenizer, real_codes.shape[1])
        recovered = [g.layout for g in Grounder(i2l_model, prompts)(l2i["codes"], [lay.phrases for lay in layouts])]
    metrics = {k: l2i["metrics"].get(k) for k in ("ap", "ap50", "ap75", "spatial", "color")}
    metrics["tolerant_l2i"] = mask_iou(l2i["codes"], layouts, shapes)
    metrics["cycle_miou"] = cycle_miou(recovered, layouts)
    metrics["grounding_acc50"] = i2l["acc50"]
    metrics["grounding_miou"] = i2l["miou"]
    metrics["grounding_parse_failure_rate"] = i2l["parse_failure_rate"]
    return metrics, {"codes": l2i["codes"], "recovered": recovered}


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


def run_demo(output_dir: str | os.PathLike, overwrite: bool = False, budget: DemoBudget | None = None) -> dict:
    """Runs the demo; writes `report.json`, `data.png` and `pictures/<stage>.png` to `output_dir`."""
    budget = budget or DemoBudget()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(0)

    print("[1/6] tiny Janus checkpoint and shapes data")
    ckpt = build_tiny_checkpoint(out / "tiny-janus")
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    shapes = ShapesConfig()
    palette = PaletteTokenizer(shapes.grid_size, shapes.patch_size)
    held_out = build_shapes_dataset(budget.eval_layouts, seed=HELD_OUT_SEED, config=shapes)
    layouts = [Layout.from_json(s) for s in held_out["layout"]]
    for layout, caption in zip(layouts, held_out["caption"]):
        layout.caption = caption
    real_codes = torch.tensor(held_out["image_codes"])
    save_png(
        image_grid([overlay(im, lay) for im, lay in zip(held_out["image"][:8], layouts[:8])], 4), out / "data.png"
    )
    cache = {"cache_dir": str(out / "cache")}

    stages, history, images = {}, {}, {}
    model = JanusForConditionalGeneration.from_pretrained(ckpt)
    print("[2/6] untrained model")
    stages["untrained"], pictures = _evaluate(model, model, tokenizer, layouts, real_codes, shapes)
    images["untrained"] = pictures["codes"]

    print("[3/6] Stage 1, PMTP")
    model, history["pmtp"] = _train("pmtp", out / "pmtp", budget.pmtp, model_name_or_path=str(ckpt), **cache)
    stages["pmtp"], pictures = _evaluate(model, model, tokenizer, layouts, real_codes, shapes)
    images["pmtp"] = pictures["codes"]
    _picture("pmtp", pictures, layouts, palette, out)

    print("[4/6] Stage 2, DJO")
    model, history["djo"] = _train("djo", out / "djo", budget.djo, model_name_or_path=str(out / "pmtp"), **cache)
    stages["djo"], pictures = _evaluate(model, model, tokenizer, layouts, real_codes, shapes)
    images["djo"] = pictures["codes"]
    _picture("djo", pictures, layouts, palette, out)

    print("[5/6] Stage 3, CycleRL (LoRA)")
    policy, history["cyclerl"] = _train(
        "cyclerl", out / "cyclerl", budget.cyclerl, model_name_or_path=str(out / "djo"), **cache
    )
    policy.eval()
    # `cycle_miou` of every stage is scored by its own grounder (for CycleRL the LoRA policy's); `cycle_miou_ref`
    # by PMTP's, below.
    stages["cyclerl"], pictures = _evaluate(policy, policy, tokenizer, layouts, real_codes, shapes)
    images["cyclerl"] = pictures["codes"]
    _picture("cyclerl", pictures, layouts, palette, out)

    print("[6/6] baseline: L2I and I2L as two models, the PMTP config's steps each")
    separate = {**budget.pmtp, "model_name_or_path": str(ckpt), **cache}
    l2i_model, _ = _train("pmtp", out / "separate-l2i", {**separate, "text_loss_weight": 0.0})
    i2l_model, _ = _train("pmtp", out / "separate-i2l", {**separate, "image_loss_weight": 0.0})
    stages["separate"], pictures = _evaluate(l2i_model, i2l_model, tokenizer, layouts, real_codes, shapes)
    images["separate"] = pictures["codes"]
    _picture("separate", pictures, layouts, palette, out)

    # Cycle mIoU of every stage by one fixed grounder, PMTP's: a stage cannot raise it by changing its own grounder.
    reference = JanusForConditionalGeneration.from_pretrained(out / "pmtp").eval()
    reference_grounder = Grounder(reference, PromptBuilder(tokenizer, real_codes.shape[1]))
    for stage, codes in images.items():
        recovered = [g.layout for g in reference_grounder(codes, [lay.phrases for lay in layouts])]
        stages[stage]["cycle_miou_ref"] = cycle_miou(recovered, layouts)

    cyclerl_rewards = [h["rewards/cycle_iou/mean"] for h in history["cyclerl"] if "rewards/cycle_iou/mean" in h]
    report = {
        "stages": stages,
        "training": {
            "pmtp": {k: _last(history["pmtp"], k) for k in ("loss_img", "loss_text", "accuracy_img", "accuracy_text")},
            "djo": {k: _last(history["djo"], k) for k in ("loss_l2i", "loss_loop", "tau")},
            "cyclerl": {"cycle_iou_reward_per_log": cyclerl_rewards},
        },
        "budget": asdict(budget),
        "configs": {stage: str(_shipped(stage)) for stage in ("pmtp", "djo", "cyclerl")},
        "held_out_layouts": len(layouts),
        "seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_stage_table(stages))
    print(f"report: {out / 'report.json'}; pictures: {out / 'pictures'} (green: target boxes, magenta: grounded)")
    print(f"{report['seconds']:.0f} s")
    return report
