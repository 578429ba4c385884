"""`echogen-rl demo`: the three stages end to end on the shapes world, offline on a CPU.

It builds the tiny checkpoint, trains PMTP -> DJO -> CycleRL with the same trainers the recipes use,
evaluates after each stage on held-out layouts (the oracle detector reads the generated code grids
exactly), and trains a "separate" baseline under the same step budget: one model on L2I only, another on
I2L only, no joint packing. It prints a table and writes `report.json` and a PNG grid per stage.
The numbers are whatever this budget gives; nothing is tuned to the held-out set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoTokenizer, JanusForConditionalGeneration

from .cyclerl_config import CycleRLConfig
from .cyclerl_trainer import CycleRLTrainer
from .data.random_layouts import build_random_layout_dataset
from .data.shapes import ShapesConfig, build_shapes_dataset, phrase_pool
from .djo_config import DJOConfig
from .djo_trainer import DJOTrainer
from .evaluation import cycle_miou, evaluate_i2l, evaluate_l2i
from .grounding import Grounder
from .image_tokenizers import PaletteTokenizer
from .layout import Layout
from .loading import DEFAULT_LORA_TARGETS
from .pmtp_config import PMTPConfig
from .pmtp_trainer import PMTPTrainer
from .prompts import PromptBuilder
from .tiny import build_tiny_checkpoint
from .visualize import image_grid, overlay, save_png

HELD_OUT_SEED = 3_000_017  # far from the training seeds (0) and the eval split (1_000_003)
COLUMNS = ("ap", "ap50", "spatial", "color", "cycle_miou", "grounding_acc50", "grounding_miou")


@dataclass
class DemoBudget:
    """Steps and sizes of the demo; `DemoBudget.quick()` is the smoke-test budget."""

    train_samples: int = 16000
    eval_layouts: int = 64
    # No CFG at this scale: with uncond_prob 0.1 two PMTP runs of 1000 steps lost the colors (color 0.05 and
    # 0.13 against 0.88 without), and without training the unconditional branch, CFG > 1 degrades images.
    guidance_scale: float = 1.0
    pmtp_steps: int = 1000
    pmtp_batch: int = 16
    pmtp_lr: float = 2e-3
    djo_steps: int = 100
    djo_batch: int = 16
    djo_lr: float = 5e-4
    cyclerl_steps: int = 30
    cyclerl_prompts_per_step: int = 4
    num_generations: int = 8
    cyclerl_lr: float = 5e-4

    @classmethod
    def quick(cls) -> DemoBudget:
        return cls(train_samples=64, eval_layouts=8, pmtp_steps=4, djo_steps=3, cyclerl_steps=2, num_generations=4)


def _common(output_dir: Path, steps: int, batch: int, lr: float) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        seed=0,
    )


def _train_pmtp(model, tokenizer, data, out: Path, budget: DemoBudget, image_w=1.0, text_w=1.0) -> list[dict]:
    args = PMTPConfig(
        **_common(out, budget.pmtp_steps, budget.pmtp_batch, budget.pmtp_lr),
        max_length=8192,
        lr_scheduler_type="cosine",
        warmup_steps=min(20, budget.pmtp_steps // 10),
        uncond_prob=0.0,
        image_loss_weight=image_w,
        text_loss_weight=text_w,
    )
    trainer = PMTPTrainer(model, args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    return trainer.state.log_history


def _train_djo(model, tokenizer, data, out: Path, budget: DemoBudget) -> list[dict]:
    args = DJOConfig(**_common(out, budget.djo_steps, budget.djo_batch, budget.djo_lr), lr_scheduler_type="constant")
    trainer = DJOTrainer(model, args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out))
    return trainer.state.log_history


def _train_cyclerl(model, tokenizer, out: Path, budget: DemoBudget):
    prompts = build_random_layout_dataset(
        budget.cyclerl_steps * budget.cyclerl_prompts_per_step, 0, phrase_pool(), grid_size=8, min_box_size=0.25
    )
    args = CycleRLConfig(
        **_common(
            out, budget.cyclerl_steps, budget.cyclerl_prompts_per_step * budget.num_generations, budget.cyclerl_lr
        ),
        num_generations=budget.num_generations,
        guidance_scale=budget.guidance_scale,
        lr_scheduler_type="constant",
        beta=0.0,
        loss_type="dapo",
        reward_funcs=["cycle_iou", "grounding_format"],
        reward_weights=[1.0, 0.1],
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=DEFAULT_LORA_TARGETS)
    trainer = CycleRLTrainer(
        model, args.reward_funcs, args, train_dataset=prompts, processing_class=tokenizer, peft_config=lora
    )
    trainer.train()
    trainer.save_model(str(out))
    return trainer.model, trainer.state.log_history


def _evaluate(l2i_model, i2l_model, tokenizer, layouts, real_codes, shapes, guidance_scale) -> tuple[dict, dict]:
    """Stage metrics: L2I by `l2i_model` (oracle detector), grounding and the cycle's return trip by `i2l_model`."""
    l2i = evaluate_l2i(l2i_model, tokenizer, layouts, "oracle", shapes, guidance_scale=guidance_scale, seed=0)
    i2l = evaluate_i2l(i2l_model, tokenizer, real_codes, layouts)
    recovered = l2i["recovered"]
    if i2l_model is not l2i_model:
        prompts = PromptBuilder(tokenizer, real_codes.shape[1])
        recovered = [g.layout for g in Grounder(i2l_model, prompts)(l2i["codes"], [lay.phrases for lay in layouts])]
    metrics = {k: l2i["metrics"].get(k) for k in ("ap", "ap50", "ap75", "spatial", "color")}
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
    train = build_shapes_dataset(budget.train_samples, seed=0, config=shapes)
    held_out = build_shapes_dataset(budget.eval_layouts, seed=HELD_OUT_SEED, config=shapes)
    layouts = [Layout.from_json(s) for s in held_out["layout"]]
    for layout, caption in zip(layouts, held_out["caption"]):
        layout.caption = caption
    real_codes = torch.tensor(held_out["image_codes"])
    save_png(
        image_grid([overlay(im, lay) for im, lay in zip(held_out["image"][:8], layouts[:8])], 4), out / "data.png"
    )

    stages, history = {}, {}
    model = JanusForConditionalGeneration.from_pretrained(ckpt)
    print("[2/6] untrained model")
    stages["untrained"], pictures = _evaluate(
        model, model, tokenizer, layouts, real_codes, shapes, budget.guidance_scale
    )

    print("[3/6] Stage 1, PMTP")
    history["pmtp"] = _train_pmtp(model, tokenizer, train, out / "pmtp", budget)
    stages["pmtp"], pictures = _evaluate(model, model, tokenizer, layouts, real_codes, shapes, budget.guidance_scale)
    _picture("pmtp", pictures, layouts, palette, out)

    print("[4/6] Stage 2, DJO")
    history["djo"] = _train_djo(model, tokenizer, train, out / "djo", budget)
    stages["djo"], pictures = _evaluate(model, model, tokenizer, layouts, real_codes, shapes, budget.guidance_scale)
    _picture("djo", pictures, layouts, palette, out)

    print("[5/6] Stage 3, CycleRL (LoRA)")
    policy, history["cyclerl"] = _train_cyclerl(model, tokenizer, out / "cyclerl", budget)
    stages["cyclerl"], pictures = _evaluate(
        policy, policy, tokenizer, layouts, real_codes, shapes, budget.guidance_scale
    )
    _picture("cyclerl", pictures, layouts, palette, out)

    print("[6/6] baseline: L2I and I2L as two models, the PMTP step budget each")
    l2i_model = JanusForConditionalGeneration.from_pretrained(ckpt)
    i2l_model = JanusForConditionalGeneration.from_pretrained(ckpt)
    _train_pmtp(l2i_model, tokenizer, train, out / "separate-l2i", budget, image_w=1.0, text_w=0.0)
    _train_pmtp(i2l_model, tokenizer, train, out / "separate-i2l", budget, image_w=0.0, text_w=1.0)
    stages["separate"], pictures = _evaluate(
        l2i_model, i2l_model, tokenizer, layouts, real_codes, shapes, budget.guidance_scale
    )
    _picture("separate", pictures, layouts, palette, out)

    cyclerl_rewards = [h["rewards/cycle_iou/mean"] for h in history["cyclerl"] if "rewards/cycle_iou/mean" in h]
    report = {
        "stages": stages,
        "training": {
            "pmtp": {k: _last(history["pmtp"], k) for k in ("loss_img", "loss_text", "accuracy_img", "accuracy_text")},
            "djo": {k: _last(history["djo"], k) for k in ("loss_l2i", "loss_loop", "tau")},
            "cyclerl": {"cycle_iou_reward_per_log": cyclerl_rewards},
        },
        "budget": asdict(budget),
        "held_out_layouts": len(layouts),
        "seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_stage_table(stages))
    print(f"report: {out / 'report.json'}; pictures: {out / 'pictures'} (green: target boxes, magenta: grounded)")
    print(f"{report['seconds']:.0f} s")
    return report
