"""COCO as layouts: [`load_coco`] reads the instances and captions JSON into one filtered layout per captioned image,
with the path of its image; [`encode_image_codes`] then turns the images into codes.

Every record is checked before it is used (present, of the right type, finite, in range): a bad one is skipped,
named by file, record and field and counted under its reason, or raises, as `on_bad_sample` says. An image whose
own record or one of whose annotations is bad is a bad layout (a layout with an object left out would teach the
model to draw what it was not asked for); a record that belongs to no image (a category, a caption, an annotation
or image without a usable id) is a bad record.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

import datasets

from echogen_rl.data.common import (
    BAD_SAMPLE_ACTIONS,
    FilterStats,
    check_choice,
    clean_phrase,
    file_backed,
    finish_layout,
    report_bad,
    require_field,
)
from echogen_rl.layout import Entity, LayoutError, boxes_from_coco_xywh


def load_coco(
    instances_file: str | os.PathLike,
    captions_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    min_box_area: float = 0.002,
    max_entities: int = 10,
    on_bad_sample: str = "skip",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, FilterStats]:
    """Loads COCO annotations as layouts: one row per captioned image, by image id, whose entities are the category
    names and boxes of its annotations in order, crowd annotations left out.

    Args:
        instances_file (`str` or `os.PathLike`): COCO instances JSON (boxes, categories, image sizes).
        captions_file (`str` or `os.PathLike`): COCO captions JSON; an image's first non-empty caption is used.
        image_dir (`str` or `os.PathLike`): directory holding the images' `file_name`s.
        min_box_area (`float`, *optional*, defaults to `0.002`): boxes under this fraction of the image are dropped.
        max_entities (`int`, *optional*, defaults to `10`): most entities per layout; the largest boxes are kept, in
            their original order.
        on_bad_sample (`str`, *optional*, defaults to `"skip"`): a bad record is skipped with a `BadSampleWarning`
            (`"skip"`) or raises a `ValueError` (`"raise"`), naming the file, the record and the field.
        cache_dir (`str` or `os.PathLike`, *optional*): where the rows are stored, see [`encode_image_codes`].

    Returns:
        `tuple[datasets.Dataset, FilterStats]`: the columns `caption`, `layout` and `image_path`, and the counts.

    Raises:
        `FileNotFoundError`: a file is missing. `ValueError`: a file is not a JSON object with lists under `images`,
            `annotations` and `categories`; or a bad record under `on_bad_sample="raise"`.
    """
    check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_ACTIONS)
    stats = FilterStats()

    def bad_record(path: Path, err: LayoutError) -> None:
        stats.bad_records += 1
        report_bad(f"{path.name}: {err}", on_bad_sample)

    instances_path, captions_path = Path(instances_file), Path(captions_file)
    instances = _read_json(instances_path, ("images", "annotations", "categories"))
    names = _category_names(instances["categories"], lambda err: bad_record(instances_path, err))
    images = _records_by_id(instances["images"], "image", lambda err: bad_record(instances_path, err))
    annotations: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for k, ann in enumerate(instances["annotations"]):
        try:
            image_id = require_field(ann, "image_id", int, f"annotation {_record_name(ann, k)}")
        except LayoutError as err:
            bad_record(instances_path, err)
            continue
        annotations[image_id].append((k, ann))
    captions = _first_captions(_read_json(captions_path, ("annotations",))["annotations"], bad_record, captions_path)

    columns: dict[str, list] = {"caption": [], "layout": [], "image_path": []}
    for image_id in sorted(images):
        caption = captions.get(image_id)
        if caption is None:
            continue
        stats.rows_in += 1
        try:
            info = images[image_id]
            file_name = require_field(info, "file_name", str, f"image {image_id}")
            size = [_image_side(info, key, image_id) for key in ("width", "height")]
            entities = [
                entity
                for k, ann in annotations.get(image_id, [])
                if (entity := _entity(ann, f"annotation {_record_name(ann, k)} of image {image_id}", names, size))
            ]
            layout = finish_layout(caption, entities, min_box_area, max_entities, stats)
        except LayoutError as err:
            stats.bad_layouts += 1
            report_bad(f"{instances_path.name}: {err}", on_bad_sample)
            continue
        if layout is not None:
            columns["caption"].append(caption)
            columns["layout"].append(layout)
            columns["image_path"].append(os.path.join(image_dir, file_name))
    stats.rows_kept = len(columns["caption"])
    return file_backed(columns, "coco", cache_dir), stats


def _read_json(path: Path, lists: tuple[str, ...]) -> dict:
    """A COCO file's object, with a list under each of `lists` (a missing key is an empty list)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such COCO file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a COCO file must hold a JSON object, got {type(data).__name__}")
    for key in lists:
        data.setdefault(key, [])
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _record_name(record: object, index: int) -> str:
    # A record's id when it has a usable one, else its position in the file's list.
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if isinstance(rid, int) and not isinstance(rid, bool) else f"#{index} (no usable id)"


def _category_names(categories: list, on_bad) -> dict[int, str]:
    names = {}
    for k, cat in enumerate(categories):
        try:
            cid = require_field(cat, "id", int, f"category #{k}")
            names[cid] = clean_phrase(require_field(cat, "name", str, f"category {cid}"))
        except LayoutError as err:
            on_bad(err)
    return names


def _records_by_id(records: list, kind: str, on_bad) -> dict[int, dict]:
    out = {}
    for k, record in enumerate(records):
        try:
            out[require_field(record, "id", int, f"{kind} #{k}")] = record
        except LayoutError as err:
            on_bad(err)
    return out


def _first_captions(records: list, bad_record, path: Path) -> dict[int, str]:
    """Each image's first non-empty caption."""
    captions: dict[int, str] = {}
    for k, record in enumerate(records):
        try:
            what = f"caption {_record_name(record, k)}"
            image_id = require_field(record, "image_id", int, what)
            text = require_field(record, "caption", str, what).strip()
        except LayoutError as err:
            bad_record(path, err)
            continue
        if text and image_id not in captions:
            captions[image_id] = text
    return captions


def _image_side(info: dict, key: str, image_id: int) -> float:
    value = require_field(info, key, (int, float), f"image {image_id}")
    if not math.isfinite(value) or value <= 0:
        raise LayoutError(f"image {image_id}: field '{key}' must be a positive finite number, got {value!r}")
    return value


def _entity(ann: dict, what: str, names: dict[int, str], size: list[float]) -> Entity | None:
    """The annotation's entity, `None` for a crowd annotation; a `LayoutError` naming `what` and the field."""
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, float):
        raise LayoutError(f"{what}: field 'iscrowd' must be 0 or 1, got {crowd!r}")
    if crowd:
        return None
    category = require_field(ann, "category_id", int, what)
    if category not in names:
        raise LayoutError(f"{what}: category_id {category} is not in the file's categories")
    try:
        box = boxes_from_coco_xywh(require_field(ann, "bbox", list, what), *size)
    except LayoutError as err:
        raise LayoutError(f"{what}: field 'bbox' {err}") from None
    return Entity(names[category], box)
