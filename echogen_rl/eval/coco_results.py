"""External detectors: a COCO results JSON read back as layouts, to score it with [`coco_ap`]."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from echogen_rl.layout import Entity, Layout, boxes_from_coco_xywh

# The fields of one detection in a COCO results JSON, and what each must hold.
_RESULT_FIELDS = {
    "image_id": "an int",
    "category_id": "one of the given category ids",
    "bbox": "[x, y, w, h], finite, with w, h >= 0",
    "score": "a finite number",
}


def read_coco_results(path: str | os.PathLike, categories: dict[int, str]) -> list[dict]:
    """The detections of a COCO results JSON, each checked (fields, types, known category).

    Raises:
        `FileNotFoundError`: no file at `path`.
        `ValueError`: the file is not a JSON list, or an entry is malformed; the message names the entry index and
            the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no COCO results file at {path}")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of detections, got {type(entries).__name__}")

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
    return entries


def coco_results_layouts(
    entries: Sequence[dict],
    image_ids: Sequence[int],
    categories: dict[int, str],
    image_sizes: Sequence[tuple[float, float]],
) -> tuple[list[Layout], list[list[float]]]:
    """Checked detections ([`read_coco_results`]) as one layout per image id (entities in entry order, pixel boxes
    normalized by that image's `(width, height)` and clipped to it) and the matching scores. Entries for other
    images are ignored."""
    index = {int(image_id): k for k, image_id in enumerate(image_ids)}
    layouts = [Layout() for _ in image_ids]
    scores: list[list[float]] = [[] for _ in image_ids]
    for entry in entries:
        k = index.get(entry["image_id"])
        if k is not None:
            # boxes_from_coco_xywh clips to the image: detectors overshoot the border by a pixel or so.
            box = boxes_from_coco_xywh(entry["bbox"], *image_sizes[k])
            layouts[k].entities.append(Entity(categories[entry["category_id"]], box))
            scores[k].append(float(entry["score"]))
    return layouts, scores


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
    if not normalized and (image_sizes is None or len(image_sizes) != len(image_ids)):
        raise ValueError("load_coco_results needs one (width, height) per image id, or normalized=True")
    entries = read_coco_results(path, categories)
    sizes = [(1.0, 1.0)] * len(image_ids) if normalized else image_sizes
    return coco_results_layouts(entries, image_ids, categories, sizes)
