"""`echogen-rl demo`: the offline CPU demo on the shapes world.

What it runs today: it builds the tiny Janus checkpoint and a shapes dataset, checks the oracle detector
on the data, then rolls out images from the (untrained) tiny model for held-out layouts and grounds
them with the in-model grounder. The training stages (PMTP, DJO, CycleRL) plug in here as they land;
until then the demo says so instead of printing numbers it did not measure.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, JanusForConditionalGeneration

from .data.shapes import ShapesConfig, build_shapes_dataset, detect_from_codes
from .grounding import Grounder
from .image_tokenizers import PaletteTokenizer
from .layout import Layout, iou
from .prompts import PromptBuilder, pad_segments
from .rollout.torch_engine import TorchRolloutEngine
from .tiny import build_tiny_checkpoint
from .visualize import image_grid, overlay, save_png

NOT_YET = ("pmtp", "djo", "cyclerl")


def _mean_matched_iou(pred: Layout, target: Layout) -> float:
    """Mean IoU over target entities, matched by phrase (0 for a missing one)."""
    if not target.entities:
        return 0.0
    found = {e.phrase: e.box for e in pred.entities}
    ious = [
        float(iou(torch.tensor([found[e.phrase]]), torch.tensor([e.box]))[0]) if e.phrase in found else 0.0
        for e in target.entities
    ]
    return sum(ious) / len(ious)


def run_demo(output_dir: str | os.PathLike, overwrite: bool = False, num_layouts: int = 8, seed: int = 0) -> dict:
    """Runs the demo and writes `report.json` and PNG grids to `output_dir`."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    start = time.perf_counter()

    print("[1/4] building the tiny Janus checkpoint")
    ckpt = build_tiny_checkpoint(out / "tiny-janus")
    model = JanusForConditionalGeneration.from_pretrained(ckpt).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    shapes = ShapesConfig()
    palette = PaletteTokenizer(shapes.grid_size, shapes.patch_size)
    prompts = PromptBuilder(tokenizer, palette.num_codes)

    print("[2/4] building the shapes data and checking the oracle detector")
    data = build_shapes_dataset(256, seed=seed, config=shapes)
    layouts = [Layout.from_json(s) for s in data["layout"]]
    exact = sum(
        detect_from_codes(c, shapes).to_dict() == lay.to_dict() | {"caption": ""}
        for c, lay in zip(data["image_codes"], layouts)
    )
    tiles = [overlay(im, lay) for im, lay in zip(data["image"][:8], layouts[:8])]
    save_png(image_grid(tiles, columns=4, titles=[lay.caption for lay in layouts[:8]]), out / "data.png")

    print("[3/4] rolling out images from the untrained model for held-out layouts")
    held_out = [Layout.from_json(s) for s in build_shapes_dataset(num_layouts, seed=seed + 1, config=shapes)["layout"]]
    batch = pad_segments([prompts.l2i_prompt(lay) for lay in held_out], prompts.pad_id, "left")
    engine = TorchRolloutEngine(model, palette.num_codes, prompts.bos_id, prompts.boi_id, prompts.pad_id)
    gen = torch.Generator().manual_seed(seed)
    rollout = engine.generate(batch["input_ids"], batch["attention_mask"], 5.0, 1.0, None, gen)
    images = palette.decode(rollout.codes)
    detected = [detect_from_codes(c, shapes) for c in rollout.codes.tolist()]

    print("[4/4] grounding the rollouts with the in-model grounder")
    grounded = Grounder(model, prompts)(rollout.codes, [lay.phrases for lay in held_out])
    tiles = [overlay(im, lay, g.layout) for im, lay, g in zip(images, held_out, grounded)]
    save_png(image_grid(tiles, columns=4, titles=[" / ".join(lay.phrases) for lay in held_out]), out / "untrained.png")

    report = {
        "data": {"samples": len(layouts), "oracle_exact_recovery": exact / len(layouts)},
        "untrained": {
            "oracle_miou": sum(map(_mean_matched_iou, detected, held_out)) / len(held_out),
            "cycle_miou": sum(_mean_matched_iou(g.layout, lay) for g, lay in zip(grounded, held_out)) / len(held_out),
            "grounding_parse_failures": sum(bool(g.problems) for g in grounded) / len(grounded),
        },
        "stages_not_yet_implemented": list(NOT_YET),
        "seconds": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"pictures: {out / 'data.png'}, {out / 'untrained.png'}")
    print("The training stages (PMTP, DJO, CycleRL) are not implemented yet; no trained numbers are reported.")
    return report
