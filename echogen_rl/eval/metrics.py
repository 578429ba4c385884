"""Metrics on layouts: pairwise spatial agreement, color and mask IoU (shapes world), strict recall, the filled-box
rate, the cycle IoU of recovered layouts and I2L grounding accuracy.

A metric with nothing to measure (no target entity, no spatial pair, no colored phrase) is `None`, not a score.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from echogen_rl.data.shapes import ShapesConfig, shape_mask
from echogen_rl.eval.coco_ap import check_pairs as _check_pairs
from echogen_rl.layout import Entity, Layout, iou, match_layouts, matched_box_scores
from echogen_rl.models.image_tokenizers import PaletteTokenizer
from echogen_rl.models.palette import COLOR_NAMES, PALETTE


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
