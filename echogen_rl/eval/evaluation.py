"""`echogen-rl eval`: both evaluations on held-out shapes layouts, and the report they write.

The metrics are in [`echogen_rl.eval.metrics`], the L2I / I2L runs that produce them in [`echogen_rl.eval.inference`]
and an external detector's results are read by [`echogen_rl.eval.coco_results`].
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from echogen_rl.data.shapes import ShapesConfig, build_shapes_dataset, codes_to_image
from echogen_rl.data.splits import EVAL_HELD_OUT_SEED
from echogen_rl.eval.inference import DETECTORS, evaluate_i2l, evaluate_l2i
from echogen_rl.eval.visualize import image_grid, overlay, save_png
from echogen_rl.layout import Layout
from echogen_rl.models.loading import load_model
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.models.sampling import resolve_guidance_scale

logger = logging.getLogger(__name__)


def write_report(results: dict, path: str | os.PathLike) -> Path:
    """Writes `results` as JSON atomically (a temporary file renamed into place): never a half-written report.

    Non-finite numbers are refused rather than written as `NaN`, which is not JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def format_table(results: dict) -> str:
    """The scalar entries of `results` as an aligned two-column table; nested dicts give dotted names."""
    rows = []

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            elif value is None:
                rows.append((prefix + key, "n/a"))
            elif isinstance(value, float):
                rows.append((prefix + key, f"{value:.4f}"))
            elif isinstance(value, (int, str)):
                rows.append((prefix + key, str(value)))

    walk("", results)
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


PICTURES = 16


def run_eval(
    model_name_or_path: str,
    output_dir: str | os.PathLike,
    adapter: str | None = None,
    dataset: str = "shapes",
    num_layouts: int = 64,
    detector: str = "oracle",
    overwrite: bool = False,
    seed: int = 0,
    guidance_scale: float | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> dict:
    """`echogen-rl eval`: both evaluations on held-out layouts; writes `eval.json`, `eval.png` and `images/`.

    `images/{id:06d}.png` are the generated images under their COCO image ids (1, 2, ...), so an external detector
    can be run on them; its results JSON is then passed as `detector` to a rerun with the same seed and batch size,
    which generates the same images. Its category ids number `phrase_pool()` from 1.

    Args:
        model_name_or_path (`str`): a Janus checkpoint (directory or hub id).
        output_dir (`str` or `os.PathLike`): where the report and pictures go; must be empty unless `overwrite`.
        adapter (`str`, *optional*): a PEFT adapter directory, merged into the model.
        dataset (`str`, *optional*, defaults to `"shapes"`): the evaluation layouts; only `"shapes"` for now.
        num_layouts (`int`, *optional*, defaults to `64`): held-out layouts evaluated.
        detector (`str`, *optional*, defaults to `"oracle"`): see [`evaluate_l2i`].
        overwrite (`bool`, *optional*, defaults to `False`): replace the report and pictures in `output_dir`.
        seed (`int`, *optional*, defaults to `0`): shifts the held-out layouts' seed and seeds generation.
        guidance_scale (`float`, *optional*): CFG scale of generation; by default the one the checkpoint records
            (see `echogen_rl.models.sampling`).
        batch_size (`int`, *optional*, defaults to `16`): layouts per rollout.
        device (`str`, *optional*): defaults to CUDA when available, else the CPU.
    """
    out = _check_eval_args(dataset, num_layouts, detector, adapter, output_dir, overwrite)
    model, tokenizer = load_model(model_name_or_path, adapter, device)
    config = _shapes_config(model)

    data = build_shapes_dataset(num_layouts, seed=EVAL_HELD_OUT_SEED + seed, config=config)
    layouts = [Layout.from_json(text) for text in data["layout"]]

    guidance_scale = resolve_guidance_scale(model, guidance_scale, "eval --guidance-scale")
    l2i = evaluate_l2i(model, tokenizer, layouts, detector, config, None, guidance_scale, 1.0, seed, batch_size)
    i2l = evaluate_i2l(model, tokenizer, data["image_codes"], layouts)
    report = {
        "model": str(model_name_or_path),
        "adapter": adapter,
        "dataset": dataset,
        "num_layouts": num_layouts,
        "detector": detector,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "l2i": l2i["metrics"],
        "i2l": i2l,
    }
    print(format_table(report))  # the command's output

    _save_pictures(out, config, l2i["codes"], layouts, l2i["recovered"])
    write_report(report, out / "eval.json")
    logger.info("report: %s, pictures: %s (target boxes green, grounded magenta)", out / "eval.json", out / "eval.png")
    return report


def _check_eval_args(
    dataset: str, num_layouts: int, detector: str, adapter: str | None, output_dir: str | os.PathLike, overwrite: bool
) -> Path:
    """Refuses the arguments of `run_eval` that cannot work, before anything is loaded; returns the output folder."""
    if dataset != "shapes":
        raise ValueError(f"--dataset {dataset!r}: only 'shapes' is supported")
    if num_layouts < 1:
        raise ValueError(f"--num-layouts must be >= 1, got {num_layouts}")
    if detector not in DETECTORS and not Path(detector).is_file():
        raise FileNotFoundError(f"--detector {detector}: no such file (or pass one of {', '.join(DETECTORS)})")
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter {adapter}: no such directory")
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its report and pictures")
    return out


def _shapes_config(model: torch.nn.Module) -> ShapesConfig:
    """The shapes world on the model's code grid; its image tokens must form a square."""
    num_codes = unwrap_janus(model).config.vision_config.num_image_tokens
    grid = math.isqrt(num_codes)
    if grid * grid != num_codes:
        raise ValueError(f"the model's {num_codes} image tokens are not a square grid")
    return ShapesConfig(grid_size=grid)


def _save_pictures(
    out: Path, config: ShapesConfig, codes: torch.Tensor, layouts: list[Layout], recovered: list[Layout]
) -> None:
    """Writes `images/{id:06d}.png` (replacing the previous run's) and `eval.png`, the first `PICTURES` images with
    their target and grounded boxes."""
    out.mkdir(parents=True, exist_ok=True)
    images = [codes_to_image(row, config) for row in codes.tolist()]
    image_dir = out / "images"
    image_dir.mkdir(exist_ok=True)
    for stale in image_dir.glob("*.png"):  # a previous run may have had more layouts
        stale.unlink()
    for image_id, image in enumerate(images, start=1):
        image.save(image_dir / f"{image_id:06d}.png")
    tiles = [overlay(im, t, r) for im, t, r in zip(images[:PICTURES], layouts, recovered)]
    save_png(image_grid(tiles, columns=4, titles=[" / ".join(t.phrases) for t in layouts]), out / "eval.png")
