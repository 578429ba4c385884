"""Evaluation: metrics on layouts, and the L2I / I2L runs that produce them.

- **L2I**: generate an image per layout, detect its objects (shapes oracle, in-model grounder, or an external
  detector's COCO results JSON) and score them against the layouts: COCO AP/AP50/AP75 (pycocotools), pairwise
  spatial agreement, color (shapes), and the cycle mIoU (the grounder's boxes for the input phrases).
- **I2L**: ground each target layout's phrases on its image: Acc@0.5, Acc@0.75, mean IoU.

A metric with nothing to measure (no target entity, no spatial pair, no colored phrase) is `None`, not a score.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from echogen_rl.data.shapes import (
    ShapesConfig,
    build_shapes_dataset,
    codes_to_image,
    detect_from_codes,
    phrase_pool,
    shape_mask,
)
from echogen_rl.eval.coco_ap import check_pairs as _check_pairs
from echogen_rl.eval.coco_ap import coco_ap
from echogen_rl.eval.visualize import image_grid, overlay, save_png
from echogen_rl.layout import Entity, Layout, boxes_from_coco_xywh, iou, match_layouts, matched_box_scores
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.image_tokenizers import JanusVQTokenizer, PaletteTokenizer
from echogen_rl.models.loading import check_checkpoint, load_janus
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.models.palette import COLOR_NAMES, PALETTE
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.models.sampling import resolve_guidance_scale
from echogen_rl.rollout.torch_engine import TorchRolloutEngine

DETECTORS = ("oracle", "grounder")
# The fields of one detection in a COCO results JSON, and what each must hold.
_RESULT_FIELDS = {
    "image_id": "an int",
    "category_id": "one of the given category ids",
    "bbox": "[x, y, w, h], finite, with w, h >= 0",
    "score": "a finite number",
}


def _center(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def spatial_accuracy(detections: Sequence[Layout], targets: Sequence[Layout], margin: float = 0.05) -> float | None:
    """Agreement of pairwise left/right and above/below relations between target and detected boxes.

    For every pair of target entities whose box centers differ by more than `margin` along x (or y), the detected
    boxes matched to them by phrase must be ordered the same way along that axis (strictly, without the margin). A
    pair with a missing or misnamed detection fails: an IoU fallback would let any overlapping blob stand in for a
    missing object and flatter a model that draws the wrong thing. Each (pair, axis) is one check; the result pools the checks of
    all images.

    Args:
        detections (`Sequence[Layout]`): the detected entities of each image.
        targets (`Sequence[Layout]`): the target layouts.
        margin (`float`, *optional*, defaults to `0.05`): center distance (normalized) below which two objects are
            side by side rather than left/right of each other, and no relation is checked.

    Returns:
        `float | None`: the fraction of checks that pass, `None` when no target has a clear pair.
    """
    _check_pairs(detections, targets)
    passed = total = 0
    for pred, target in zip(detections, targets):
        centers = [_center(box) for box in target.boxes]
        matches = match_layouts(pred, target, by_iou=False)
        found = [None if j is None else _center(pred.entities[j].box) for j in matches]
        for (a, b), axis in itertools.product(itertools.permutations(range(len(centers)), 2), (0, 1)):
            if centers[a][axis] < centers[b][axis] - margin:  # a is left of (axis 0) or above (axis 1) b
                total += 1
                passed += found[a] is not None and found[b] is not None and found[a][axis] < found[b][axis]
    return passed / total if total else None


def color_accuracy(
    codes_or_images: torch.Tensor | Sequence[Sequence[int]] | Sequence[Image.Image],
    targets: Sequence[Layout],
    config: ShapesConfig | None = None,
) -> float | None:
    """Shapes world: whether the dominant color inside each target box is the color its phrase names.

    The cells inside a box (snapped to the grid as when drawing) vote with their palette color; background and
    codes outside the palette do not vote, and a box without any colored cell fails. Ties go to the earlier palette
    color. Entities whose phrase does not start with a palette color are not scored.

    Args:
        codes_or_images (`torch.Tensor`, `Sequence[Sequence[int]]` or `Sequence[PIL.Image.Image]`): the images as
            row-major codes `[B, grid_size**2]`, or as RGB images (read with a `PaletteTokenizer`).
        targets (`Sequence[Layout]`): entities named `"<color> <kind>"`.
        config (`ShapesConfig`, *optional*, defaults to `ShapesConfig()`): the grid.

    Returns:
        `float | None`: the fraction of scored entities with the right color, `None` if none is scored.
    """
    config = config or ShapesConfig()
    g = config.grid_size
    if len(codes_or_images) and isinstance(codes_or_images[0], Image.Image):
        codes_or_images = PaletteTokenizer(g, config.patch_size).encode(codes_or_images)
    grids = np.asarray(torch.as_tensor(codes_or_images, dtype=torch.long).cpu()).reshape(len(codes_or_images), -1)
    _check_pairs(grids, targets, "images")
    if grids.shape[1] != g * g:
        raise ValueError(f"expected {g * g} codes per image for a {g}x{g} grid, got {grids.shape[1]}")
    right = total = 0
    for grid, target in zip(grids.reshape(-1, g, g), targets):
        for e in target.entities:
            color = e.phrase.split()[0].lower() if e.phrase.split() else ""
            if color not in COLOR_NAMES:
                continue
            x1, y1, x2, y2 = (round(v * g) for v in e.box)
            cells = grid[y1:y2, x1:x2].ravel()
            votes = np.bincount(cells[(cells > 0) & (cells < len(PALETTE))], minlength=len(PALETTE))
            total += 1
            right += bool(votes.any()) and COLOR_NAMES[int(votes.argmax()) - 1] == color
    return right / total if total else None


def _shape_cells(entity: Entity, g: int) -> np.ndarray | None:
    """The cells a drawing of `entity` fills on a `g x g` grid (its kind's mask in its snapped box), or `None`
    when its phrase is not `"<color> <kind>"` or the kind has no mask there (then the whole box counts)."""
    color, _, kind = " ".join(entity.phrase.lower().split()).partition(" ")
    if color not in COLOR_NAMES:
        return None
    x1, y1, x2, y2 = (min(g, max(0, round(v * g))) for v in entity.box)
    cells = np.zeros((g, g), dtype=bool)
    if x2 <= x1 or y2 <= y1:
        return cells
    mask = shape_mask(kind, x2 - x1, y2 - y1)
    cells[y1:y2, x1:x2] = True if mask is None else mask
    return cells


def mask_iou_per_image(
    codes: torch.Tensor | Sequence[Sequence[int]], targets: Sequence[Layout], config: ShapesConfig | None = None
) -> list[float | None]:
    """Shapes world, tolerant L2I: per image, the mean over target entities of the IoU between the cells painted
    in the phrase's color and the cells the named shape fills in its box.

    Unlike AP, a shape drawn nearly right earns nearly full credit, and the kind is judged only through the cells:
    a box painted full for a circle scores the circle's share of the box (e.g. 12/16 in a 4 x 4 box), an exact
    drawing 1, a missing color 0. Colors of one image are distinct in this world, so a phrase's color marks its
    object. `None` for an image with no entity named `"<color> ..."`.
    """
    config = config or ShapesConfig()
    g = config.grid_size
    grids = np.asarray(torch.as_tensor(codes, dtype=torch.long).cpu()).reshape(len(codes), -1)
    _check_pairs(grids, targets, "images")
    if grids.shape[1] != g * g:
        raise ValueError(f"expected {g * g} codes per image for a {g}x{g} grid, got {grids.shape[1]}")
    scores = []
    for grid, target in zip(grids.reshape(-1, g, g), targets):
        ious = []
        for entity in target.entities:
            want = _shape_cells(entity, g)
            if want is None:
                continue
            painted = grid == COLOR_NAMES.index(entity.phrase.lower().split()[0]) + 1
            union = (painted | want).sum()
            ious.append(float((painted & want).sum() / union) if union else 0.0)
        scores.append(float(np.mean(ious)) if ious else None)
    return scores


def strict_recall50(detections: Sequence[Layout], targets: Sequence[Layout]) -> list[float | None]:
    """Per layout, the share of target entities the oracle found with the same phrase (color and kind) at
    IoU >= 0.5: the per-layout counterpart of AP50, so that it gets a paired interval."""
    out = []
    for det, target in zip(detections, targets):
        if not len(target):
            out.append(None)
            continue
        matches = match_layouts(det, target, by_iou=False)
        hits = [
            j is not None and float(iou(torch.tensor(det.entities[j].box), torch.tensor(e.box))) >= 0.5
            for e, j in zip(target.entities, matches)
        ]
        out.append(float(np.mean(hits)))
    return out


ROUND_KINDS = ("circle", "triangle")  # the kinds whose drawing is not their filled box


def filled_box_rate(detections: Sequence[Layout], targets: Sequence[Layout]) -> list[float | None]:
    """Per image, the share of its round entities (circle, triangle) that the oracle reads as a filled box of the
    phrase's color (a square or rectangle component) at IoU >= 0.5 with the target box: the blob a reward that
    reads only color and position pays for. `None` for an image without a round entity."""
    out = []
    for det, target in zip(detections, targets):
        flags = []
        for entity in target.entities:
            color, _, kind = " ".join(entity.phrase.lower().split()).partition(" ")
            if kind not in ROUND_KINDS:
                continue
            box = torch.tensor(entity.box)
            flags.append(
                any(
                    d.phrase in (f"{color} square", f"{color} rectangle")
                    and float(iou(torch.tensor(d.box), box)) >= 0.5
                    for d in det.entities
                )
            )
        out.append(float(np.mean(flags)) if flags else None)
    return out


def mask_iou(
    codes: torch.Tensor | Sequence[Sequence[int]], targets: Sequence[Layout], config: ShapesConfig | None = None
) -> float | None:
    """The mean of [`mask_iou_per_image`] over the images it scores; `None` if it scores none."""
    scores = [s for s in mask_iou_per_image(codes, targets, config) if s is not None]
    return float(np.mean(scores)) if scores else None


def cycle_iou_per_image(recovered: Sequence[Layout], targets: Sequence[Layout]) -> list[float | None]:
    """Per image, the mean IoU of each target entity with its `match_layouts` partner (0 if none); `None` for an
    image without target entities."""
    _check_pairs(recovered, targets, "recovered layouts")
    return [float(np.mean(matched_box_scores(r, t))) if len(t) else None for r, t in zip(recovered, targets)]


def cycle_miou(recovered: Sequence[Layout], targets: Sequence[Layout]) -> float | None:
    """Mean over images of the mean IoU of each target entity with its `match_layouts` partner (0 if none).

    Images without target entities are skipped; `None` when no image has any.
    """
    _check_pairs(recovered, targets, "recovered layouts")
    per_image = [np.mean(matched_box_scores(r, t)) for r, t in zip(recovered, targets) if len(t)]
    return float(np.mean(per_image)) if per_image else None


def grounding_accuracy(predictions: Sequence[Layout], targets: Sequence[Layout]) -> dict:
    """I2L accuracy pooled over all target entities, matched with `match_layouts` (a missing box has IoU 0).

    Returns:
        `dict`: `acc50` and `acc75`, the fractions of target entities whose box has IoU >= 0.5 / 0.75, and `miou`,
        their mean IoU; all `None` when there is no target entity.
    """
    _check_pairs(predictions, targets, "predictions")
    ious = np.array([v for p, t in zip(predictions, targets) for v in matched_box_scores(p, t)])
    if not len(ious):
        return {"acc50": None, "acc75": None, "miou": None}
    return {"acc50": float((ious >= 0.5).mean()), "acc75": float((ious >= 0.75).mean()), "miou": float(ious.mean())}


def load_coco_results(
    path: str | os.PathLike,
    image_ids: Sequence[int],
    categories: dict[int, str],
    image_sizes: Sequence[tuple[float, float]] | None = None,
    normalized: bool = False,
) -> tuple[list[Layout], list[list[float]]]:
    """Reads an external detector's COCO results JSON as layouts, to score it with [`coco_ap`].

    This is the InstanceDiffusion protocol: generate images for COCO val2017 layouts, run your own detector (e.g.
    YOLO) on them and save its detections as `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]`.

    Args:
        path (`str` or `os.PathLike`): the results JSON.
        image_ids (`Sequence[int]`): the evaluated images, in the order of the returned layouts. Entries for other
            images are ignored, so one results file serves any subset.
        categories (`dict[int, str]`): category id -> phrase, e.g. COCO's `{1: "person", ...}`.
        image_sizes (`Sequence[tuple[float, float]]`, *optional*): `(width, height)` in pixels of each image of
            `image_ids`, to normalize the pixel boxes. Required unless `normalized`.
        normalized (`bool`, *optional*, defaults to `False`): the boxes are already in [0, 1] image units.

    Returns:
        `tuple[list[Layout], list[list[float]]]`: one layout per image id (entities in file order, boxes clipped
        to the image) and the matching scores.

    Raises:
        `FileNotFoundError`: no file at `path`.
        `ValueError`: the file is not a JSON list, or an entry is malformed; the message names the entry index and
            the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no COCO results file at {path}")
    if not normalized and (image_sizes is None or len(image_sizes) != len(image_ids)):
        raise ValueError("load_coco_results needs one (width, height) per image id, or normalized=True")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of detections, got {type(entries).__name__}")
    index = {int(image_id): k for k, image_id in enumerate(image_ids)}
    sizes = [(1.0, 1.0)] * len(image_ids) if normalized else image_sizes
    layouts = [Layout() for _ in image_ids]
    scores: list[list[float]] = [[] for _ in image_ids]

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for n, entry in enumerate(entries):
        missing = next((k for k in _RESULT_FIELDS if not isinstance(entry, dict) or k not in entry), None)
        if missing:
            raise ValueError(f"{path}: entry {n}: missing field '{missing}' in {entry!r}")
        image_id, category_id, bbox, score = (entry[k] for k in _RESULT_FIELDS)
        valid = {
            "image_id": isinstance(image_id, int) and not isinstance(image_id, bool),
            "category_id": isinstance(category_id, int) and category_id in categories,
            "bbox": isinstance(bbox, list) and len(bbox) == 4 and all(map(number, bbox)) and min(bbox[2:]) >= 0,
            "score": number(score),
        }
        bad = next((k for k, ok in valid.items() if not ok), None)
        if bad:
            raise ValueError(f"{path}: entry {n}: field '{bad}' must be {_RESULT_FIELDS[bad]}, got {entry[bad]!r}")
        if image_id in index:
            k = index[image_id]
            # boxes_from_coco_xywh clips to the image: detectors overshoot the border by a pixel or so.
            layouts[k].entities.append(Entity(categories[category_id], boxes_from_coco_xywh(bbox, *sizes[k])))
            scores[k].append(float(score))
    return layouts, scores


def _prompts(model: torch.nn.Module, tokenizer) -> PromptBuilder:
    return PromptBuilder(tokenizer, unwrap_janus(model).config.vision_config.num_image_tokens)


@torch.no_grad()
def generate_images(
    model: torch.nn.Module,
    tokenizer,
    layouts: Sequence[Layout],
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> torch.LongTensor:
    """Generates one image per layout with the torch rollout engine.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP).
        tokenizer (`PreTrainedTokenizerBase`): its text tokenizer, with the layout tags.
        layouts (`Sequence[Layout]`): the prompts (caption and entities).
        guidance_scale (`float`, *optional*, defaults to `5.0`): classifier-free guidance scale.
        temperature (`float`, *optional*, defaults to `1.0`): `0` decodes greedily.
        seed (`int`, *optional*, defaults to `0`): seeds one generator drawn from batch after batch, so the images
            depend on the seed and the batch size, never on the global RNG.
        batch_size (`int`, *optional*, defaults to `16`): layouts per rollout.

    Returns:
        `torch.LongTensor` of shape `[len(layouts), num_image_tokens]`: the codes, on the CPU.
    """
    prompts = _prompts(model, tokenizer)
    device = unwrap_janus(model).lm_head.weight.device
    engine = TorchRolloutEngine(model, prompts.num_image_tokens, prompts.bos_id, prompts.boi_id, prompts.pad_id)
    generator = torch.Generator(device=device).manual_seed(seed)
    codes = []
    for start in tqdm(range(0, len(layouts), batch_size), desc="L2I generate", unit="batch"):
        segments = [prompts.l2i_prompt(layout) for layout in layouts[start : start + batch_size]]
        batch = pad_segments(segments, prompts.pad_id, "left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        codes.append(engine.generate(ids, mask, guidance_scale, temperature, None, generator).codes.cpu())
    return torch.cat(codes) if codes else torch.zeros(0, prompts.num_image_tokens, dtype=torch.long)


def evaluate_l2i(
    model: torch.nn.Module,
    tokenizer,
    layouts: Sequence[Layout],
    detector: str = "oracle",
    shapes_config: ShapesConfig | None = None,
    categories: dict[int, str] | None = None,
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    spatial_margin: float = 0.05,
) -> dict:
    """Generates an image per layout, detects its objects and scores the detections against the layouts.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP).
        tokenizer (`PreTrainedTokenizerBase`): its text tokenizer.
        layouts (`Sequence[Layout]`): the evaluation layouts; image `i` has COCO image id `i + 1`.
        detector (`str`, *optional*, defaults to `"oracle"`): `"oracle"` (the shapes detector, exact on the code
            grid), `"grounder"` (the model grounds the layout's phrases on its own image) or the path of a COCO
            results JSON of an external detector run on the generated images (see [`load_coco_results`]).
        shapes_config (`ShapesConfig`, *optional*): the shapes grid; required by the oracle, enables the color
            metric and, for a results JSON, sets the image size and the default categories.
        categories (`dict[int, str]`, *optional*): category id -> phrase of a results JSON; defaults to the shapes
            phrase pool numbered from 1 (`phrase_pool(shapes_config)`).
        guidance_scale, temperature, seed, batch_size: passed to [`generate_images`].
        spatial_margin (`float`, *optional*, defaults to `0.05`): see [`spatial_accuracy`].

    Returns:
        `dict`: `metrics` (`ap`, `ap50`, `ap75`, `dropped_detections`, `spatial`, `color` (shapes only),
        `cycle_miou`), and for pictures `codes` (`[N, num_image_tokens]`), `detections` and `recovered` (the
        grounder's layouts, used for the cycle mIoU).
    """
    if detector == "oracle" and shapes_config is None:
        raise ValueError("the oracle detector reads shapes code grids: pass shapes_config")
    if detector not in DETECTORS and not Path(detector).is_file():
        raise FileNotFoundError(f"detector {detector!r} is neither one of {DETECTORS} nor a COCO results file")
    if detector not in DETECTORS and categories is None and shapes_config is None:
        raise ValueError("a COCO results file needs categories (category id -> phrase)")
    codes = generate_images(model, tokenizer, layouts, guidance_scale, temperature, seed, batch_size)
    grounded = Grounder(model, _prompts(model, tokenizer))(codes, [layout.phrases for layout in layouts])
    recovered = [g.layout for g in grounded]
    scores = None
    if detector == "oracle":
        detections = [detect_from_codes(row, shapes_config) for row in codes.tolist()]
    elif detector == "grounder":
        detections = recovered
    else:
        categories = categories or dict(enumerate(phrase_pool(shapes_config), start=1))
        size = shapes_config.image_size if shapes_config else JanusVQTokenizer.from_model(model).image_size
        ids = list(range(1, len(layouts) + 1))
        detections, scores = load_coco_results(detector, ids, categories, [(size, size)] * len(ids))
    metrics = coco_ap(detections, layouts, scores)
    metrics["spatial"] = spatial_accuracy(detections, layouts, spatial_margin)
    if shapes_config is not None:
        metrics["color"] = color_accuracy(codes, layouts, shapes_config)
    metrics["cycle_miou"] = cycle_miou(recovered, layouts)
    return {"metrics": metrics, "codes": codes, "detections": detections, "recovered": recovered}


def evaluate_i2l(
    model: torch.nn.Module, tokenizer, codes: torch.Tensor | Sequence[Sequence[int]], targets: Sequence[Layout]
) -> dict:
    """Grounds each target's phrases on its image with the in-model grounder.

    Returns:
        `dict`: `acc50`, `acc75`, `miou` (see [`grounding_accuracy`]) and `parse_failure_rate`, the fraction of
        images whose answer was malformed, misnamed an entity or left one out.
    """
    _check_pairs(codes, targets, "images")
    results = Grounder(model, _prompts(model, tokenizer))(codes, [t.phrases for t in targets])
    metrics = grounding_accuracy([r.layout for r in results], targets)
    metrics["parse_failure_rate"] = sum(bool(r.problems) for r in results) / len(results) if results else None
    return metrics


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


# Held-out shapes layouts come from this seed (plus the run's seed): far from the training splits, which use small
# dataset seeds and dataset_seed + 1_000_003 for their eval split.
HELD_OUT_SEED = 2_000_003
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

    hub_id = model_name_or_path.count("/") == 1 and not model_name_or_path.startswith((".", "/", "~"))
    if not Path(model_name_or_path).exists() and not hub_id:
        raise FileNotFoundError(f"--model {model_name_or_path}: no such checkpoint directory")
    try:
        model, tokenizer = load_janus(model_name_or_path)
    except OSError as err:
        raise FileNotFoundError(f"--model {model_name_or_path}: no checkpoint could be loaded there ({err})") from err
    if adapter is not None:
        from peft import PeftModel

        # Merged, the adapter costs nothing at generation time.
        check_checkpoint(adapter)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    num_codes = unwrap_janus(model).config.vision_config.num_image_tokens
    grid = math.isqrt(num_codes)
    if grid * grid != num_codes:
        raise ValueError(f"the model's {num_codes} image tokens are not a square grid")
    config = ShapesConfig(grid_size=grid)

    data = build_shapes_dataset(num_layouts, seed=HELD_OUT_SEED + seed, config=config)
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
    print(format_table(report))

    out.mkdir(parents=True, exist_ok=True)
    images = [codes_to_image(row, config) for row in l2i["codes"].tolist()]
    image_dir = out / "images"
    image_dir.mkdir(exist_ok=True)
    for stale in image_dir.glob("*.png"):  # a previous run may have had more layouts
        stale.unlink()
    for image_id, image in enumerate(images, start=1):
        image.save(image_dir / f"{image_id:06d}.png")
    tiles = [overlay(im, t, r) for im, t, r in zip(images[:PICTURES], layouts, l2i["recovered"])]
    save_png(image_grid(tiles, columns=4, titles=[" / ".join(t.phrases) for t in layouts]), out / "eval.png")
    write_report(report, out / "eval.json")
    print(f"report: {out / 'eval.json'}, pictures: {out / 'eval.png'} (target boxes green, grounded magenta)")
    return report
