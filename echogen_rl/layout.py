"""Layouts: entities (phrase + normalized xyxy box), their text format, validation and geometry.

The text format is PlanGen's, so PlanGen and LayoutSAM data and parsers interoperate::

    <grounding><ref>red square</ref><box>[120, 80, 370, 330]</box>...</grounding>

Coordinates are xyxy normalized to [0, 1] and written as integers `round(1000 * v)`.

A grounder asked for a phrase the image does not hold answers with an empty box, "not present"::

    <grounding><ref>red circle</ref><box>[]</box></grounding>

Such a phrase is listed in `Layout.absent`, never as an entity; [`grounding_answer`] writes an answer in query order.
Layout text is read back by [`echogen_rl.layout_text.parse_layout`].
"""

from __future__ import annotations

import json
import math
import numbers
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

GROUNDING_START, GROUNDING_END = "<grounding>", "</grounding>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
LAYOUT_TAGS: tuple[str, ...] = (GROUNDING_START, GROUNDING_END, REF_START, REF_END, BOX_START, BOX_END)
COORD_SCALE = 1000
ABSENT_BOX = "[]"  # the box of a phrase the image does not hold
Box = tuple[float, float, float, float]  # (x1, y1, x2, y2)


class LayoutError(ValueError):
    """An invalid layout; the message names the entity index, the field and the value at fault."""


@dataclass(frozen=True)
class Entity:
    """One object of a layout.

    Args:
        phrase (`str`): what the object is, e.g. `"red circle"`.
        box (`tuple[float, float, float, float]`): `(x1, y1, x2, y2)` normalized to [0, 1].
    """

    phrase: str
    box: tuple[float, float, float, float]


@dataclass
class Layout:
    """A global caption and its entities, in order.

    Args:
        entities (`list[Entity]`): the objects, in the order they are written and queried.
        caption (`str`, *optional*, defaults to `""`): the global caption.
        absent (`list[str]`, *optional*): phrases a grounder answered "not present" (`<box>[]</box>`).
    """

    entities: list[Entity] = field(default_factory=list)
    caption: str = ""
    absent: list[str] = field(default_factory=list)

    @property
    def phrases(self) -> list[str]:
        return [e.phrase for e in self.entities]

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [e.box for e in self.entities]

    def __len__(self) -> int:
        return len(self.entities)

    def to_text(self) -> str:
        """The PlanGen layout text of the entities (the caption is not part of it)."""
        parts = [GROUNDING_START]
        for e in self.entities:
            coords = ", ".join(str(quantize(v)) for v in e.box)
            parts.append(f"{REF_START}{e.phrase}{REF_END}{BOX_START}[{coords}]{BOX_END}")
        parts.append(GROUNDING_END)
        return "".join(parts)

    def to_dict(self) -> dict:
        data = {"caption": self.caption, "entities": [{"phrase": e.phrase, "box": list(e.box)} for e in self.entities]}
        if self.absent:
            data["absent"] = list(self.absent)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        """Builds a layout from `{"caption": str, "entities": [{"phrase": str, "box": [x1, y1, x2, y2]}]}`."""
        if not isinstance(data, dict):
            raise LayoutError(f"layout must be a JSON object, got {type(data).__name__}")
        raw = data.get("entities", [])
        if not isinstance(raw, list):
            raise LayoutError(f"layout field 'entities' must be a list, got {type(raw).__name__}")
        entities = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "phrase" not in item or "box" not in item:
                raise LayoutError(f"entity {i}: expected an object with 'phrase' and 'box', got {item!r}")
            box = item["box"]
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise LayoutError(f"entity {i}: field 'box' must be 4 numbers [x1, y1, x2, y2], got {box!r}")
            try:
                box = tuple(float(v) for v in box)
            except (TypeError, ValueError, OverflowError) as err:  # OverflowError: an int beyond float range
                raise LayoutError(f"entity {i}: field 'box' holds a non-number: {box!r}") from err
            entities.append(Entity(str(item["phrase"]), box))
        caption = data.get("caption", "")
        absent = data.get("absent", [])
        if not isinstance(absent, list) or not all(isinstance(p, str) for p in absent):
            raise LayoutError(f"layout field 'absent' must be a list of phrases, got {absent!r}")
        return cls(entities, caption if isinstance(caption, str) else str(caption), list(absent))

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            data = json.loads(text)
        # Besides JSONDecodeError: ValueError for an int over 4300 digits, RecursionError for deep nesting.
        except (ValueError, RecursionError) as err:
            raise LayoutError(f"layout is not valid JSON: {type(err).__name__}: {err}") from err
        return cls.from_dict(data)

    def validate(self) -> None:
        """Raises `LayoutError` on the first invalid entity, see `validate_layout`."""
        validate_layout(self)


def quantize(v: float) -> int:
    """A normalized coordinate as the integer written in layout text, clamped to [0, 1000]."""
    if not math.isfinite(v):
        raise LayoutError(f"coordinate is not finite: {v!r}")
    return min(COORD_SCALE, max(0, round(COORD_SCALE * v)))


def _check_entity(phrase: object, box: object) -> None:
    """Raises `LayoutError` (without the entity index, callers add it) if `phrase` or `box` is invalid."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise LayoutError(f"field 'phrase' is empty: {phrase!r}")
    # A tag inside a phrase would change the meaning of the layout text once written.
    tag = next((t for t in LAYOUT_TAGS if t in phrase), None)
    if tag is not None:
        raise LayoutError(f"field 'phrase' contains the tag {tag}: {phrase!r}")
    if not isinstance(box, (tuple, list)) or len(box) != 4:
        raise LayoutError(f"field 'box' must be 4 numbers [x1, y1, x2, y2], got {box!r}")
    for name, v in zip(("x1", "y1", "x2", "y2"), box):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise LayoutError(f"field 'box' {name} is not a number: {v!r}")
        if not math.isfinite(v):
            raise LayoutError(f"field 'box' {name} is not finite: {v!r}")
        if not 0 <= v <= 1:
            raise LayoutError(f"field 'box' {name} = {v!r} is outside [0, 1]")
    x1, y1, x2, y2 = box
    if x2 <= x1:
        raise LayoutError(f"field 'box' has x2 <= x1: {list(box)!r}")
    if y2 <= y1:
        raise LayoutError(f"field 'box' has y2 <= y1: {list(box)!r}")


def validate_layout(layout: Layout) -> None:
    """Checks every entity of a layout.

    Args:
        layout (`Layout`): the layout to check.

    Raises:
        `LayoutError`: on the first entity whose box is not 4 finite numbers in [0, 1] with `x1 < x2` and `y1 < y2`,
            or whose phrase is empty or holds one of `LAYOUT_TAGS`. The message names the entity index, the field
            and the value.
    """
    if not isinstance(layout, Layout):
        raise LayoutError(f"expected a Layout, got {type(layout).__name__}")
    for i, entity in enumerate(layout.entities):
        if not isinstance(entity, Entity):
            raise LayoutError(f"entity {i}: expected an Entity, got {type(entity).__name__}")
        try:
            _check_entity(entity.phrase, entity.box)
        except LayoutError as err:
            raise LayoutError(f"entity {i}: {err}") from None


def grounding_answer(query: Sequence[str], layout: Layout) -> str:
    """The layout text answering `query` in its order: each phrase's box, or `[]` (not present) for a phrase
    the layout does not hold. The k-th query of a phrase takes the k-th entity with that phrase.

    Args:
        query (`Sequence[str]`): the phrases asked for, in order.
        layout (`Layout`): what the image holds.
    """
    by_phrase: dict[str, deque[Entity]] = defaultdict(deque)
    for entity in layout.entities:
        by_phrase[_phrase_key(entity.phrase)].append(entity)
    parts = [GROUNDING_START]
    for phrase in query:
        queue = by_phrase.get(_phrase_key(phrase))
        if queue:
            entity = queue.popleft()
            coords = ", ".join(str(quantize(v)) for v in entity.box)
            parts.append(f"{REF_START}{entity.phrase}{REF_END}{BOX_START}[{coords}]{BOX_END}")
        else:
            parts.append(f"{REF_START}{phrase}{REF_END}{BOX_START}{ABSENT_BOX}{BOX_END}")
    parts.append(GROUNDING_END)
    return "".join(parts)


# Keeps degenerate (zero-area) boxes from dividing by zero; small against any box a 1000-step grid can express.
_EPS = 1e-7


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of xyxy boxes of shape `[..., 4]`, as shape `[...]`; inverted boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise IoU of xyxy boxes `a` and `b` of broadcastable shapes `[..., 4]`, as shape `[...]`, in [0, 1]."""
    inter, union = _intersection_union(a, b)
    return inter / union.clamp(min=_EPS)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of `a` (`[N, 4]`) with every box of `b` (`[M, 4]`), as shape `[N, M]`."""
    return iou(a[:, None, :], b[None, :, :])


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise generalized IoU of xyxy boxes of broadcastable shapes `[..., 4]`, in [-1, 1].

    Unlike IoU it keeps decreasing as disjoint boxes move apart, which gives a signal where IoU is flat at 0.
    """
    inter, union = _intersection_union(a, b)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = (hull_wh[..., 0] * hull_wh[..., 1]).clamp(min=_EPS)
    return inter / union.clamp(min=_EPS) - (hull - union) / hull


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise mean absolute difference of the 4 coordinates of boxes of shapes `[..., 4]`."""
    return (a - b).abs().mean(dim=-1)


def center_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise Euclidean distance between the centers of xyxy boxes of shapes `[..., 4]`."""
    center_a = (a[..., :2] + a[..., 2:]) / 2
    center_b = (b[..., :2] + b[..., 2:]) / 2
    return torch.linalg.vector_norm(center_a - center_b, dim=-1)


def _phrase_key(phrase: str) -> str:
    return " ".join(phrase.split()).lower()


def match_layouts(pred: Layout, target: Layout, by_iou: bool = True) -> list[int | None]:
    """Matches predicted entities to target entities, one to one.

    First by phrase (case-insensitive, whitespace-normalized): the k-th target entity with a phrase matches the k-th
    predicted entity with that phrase, so repeated objects pair up in writing order. The entities left on both sides
    (renamed or surplus phrases) are then paired by Hungarian assignment maximizing the total IoU of their boxes,
    keeping only pairs that overlap (IoU > 0): a disjoint box is no evidence that two entities are the same.

    Args:
        pred (`Layout`): the predicted layout.
        target (`Layout`): the reference layout.
        by_iou (`bool`, *optional*, defaults to `True`): pair the leftovers by IoU; `False` matches by phrase only.

    Returns:
        `list[int | None]`: one item per target entity, in order: the index in `pred.entities` of its match, or
        `None` when it has none.
    """
    by_phrase: dict[str, deque[int]] = defaultdict(deque)
    for j, entity in enumerate(pred.entities):
        by_phrase[_phrase_key(entity.phrase)].append(j)
    matches: list[int | None] = []
    for entity in target.entities:
        queue = by_phrase.get(_phrase_key(entity.phrase))
        matches.append(queue.popleft() if queue else None)
    taken = {j for j in matches if j is not None}
    free_target = [i for i, j in enumerate(matches) if j is None]
    free_pred = [j for j in range(len(pred.entities)) if j not in taken]
    if by_iou and free_target and free_pred:
        target_boxes = torch.tensor([target.entities[i].box for i in free_target], dtype=torch.float64)
        pred_boxes = torch.tensor([pred.entities[j].box for j in free_pred], dtype=torch.float64)
        overlap = pairwise_iou(target_boxes, pred_boxes).numpy()
        for r, c in zip(*linear_sum_assignment(overlap, maximize=True)):
            if overlap[r, c] > 0:
                matches[free_target[r]] = free_pred[c]
    return matches


def matched_box_scores(pred: Layout, target: Layout, score=None, missing: float = 0.0) -> list[float]:
    """One score per target entity: `score(predicted box, target box)` with its `match_layouts` partner, or
    `missing` when it has none. `score` is a vectorized box function ([N, 4], [N, 4]) -> [N]; IoU by default."""
    score = score or iou
    matches = match_layouts(pred, target)
    pairs = [(j, k) for k, j in enumerate(matches) if j is not None]
    out = [missing] * len(matches)
    if pairs:
        pred_boxes = torch.tensor([pred.entities[j].box for j, _ in pairs], dtype=torch.float64)
        gold_boxes = torch.tensor([target.entities[k].box for _, k in pairs], dtype=torch.float64)
        for (_, k), value in zip(pairs, score(pred_boxes, gold_boxes).tolist()):
            out[k] = value
    return out


def boxes_from_pixel_xyxy(box: Box, width: float, height: float) -> Box:
    """A pixel xyxy box as normalized xyxy, clipped to [0, 1] (annotations often overshoot the image by a pixel).

    Args:
        box (`tuple[float, float, float, float]`): `(x1, y1, x2, y2)` in pixels.
        width (`float`): image width in pixels.
        height (`float`): image height in pixels.

    Returns:
        `tuple[float, float, float, float]`: the normalized box. A box wholly outside the image clips to a zero-area
        box, which `validate_layout` rejects.

    Raises:
        `LayoutError`: if `width` or `height` is not a positive finite number, or `box` is not 4 finite numbers, or
            has a negative size.
    """
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not math.isfinite(size) or size <= 0:
            raise LayoutError(f"image {name} must be a positive finite number, got {size!r}")
    _check_box_numbers(box)
    if box[2] < box[0] or box[3] < box[1]:
        raise LayoutError(f"box has a negative size (x2 < x1 or y2 < y1): {list(box)!r}")
    x1, y1, x2, y2 = (min(1.0, max(0.0, v / s)) for v, s in zip(box, (width, height, width, height)))
    return x1, y1, x2, y2


def _check_box_numbers(box: object) -> None:
    # Clipping would turn a NaN into 0 silently (max(0.0, nan) is 0.0): every coordinate must be a finite number.
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise LayoutError(f"box must be 4 numbers, got {box!r}")
    for i, v in enumerate(box):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LayoutError(f"box coordinate {i} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise LayoutError(f"box coordinate {i} is {v}, not a finite number")


def boxes_from_coco_xywh(box: Box, width: float, height: float) -> Box:
    """A COCO pixel box `(x, y, w, h)` as normalized xyxy, clipped to [0, 1]; see `boxes_from_pixel_xyxy`.

    Args:
        box (`tuple[float, float, float, float]`): `(x, y, w, h)` in pixels, `(x, y)` the top-left corner.
        width (`float`): image width in pixels.
        height (`float`): image height in pixels.

    Returns:
        `tuple[float, float, float, float]`: the normalized xyxy box.
    """
    _check_box_numbers(box)
    x, y, w, h = box
    if w < 0 or h < 0:
        raise LayoutError(f"box size must not be negative, got width {w} and height {h}")
    return boxes_from_pixel_xyxy((x, y, x + w, y + h), width, height)
