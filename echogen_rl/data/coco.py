"""COCO as layouts: [`load_coco`] reads the instances and captions JSON into one filtered layout per captioned image,
with the path of its image; [`encode_image_codes`] then turns the images into codes."""

from __future__ import annotations

import os

import datasets
from pycocotools.coco import COCO

from echogen_rl.data.common import (
    BAD_SAMPLE_ACTIONS,
    FilterStats,
    check_choice,
    clean_phrase,
    file_backed,
    finish_layout,
    report_bad,
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
        on_bad_sample (`str`, *optional*, defaults to `"skip"`): an invalid layout is skipped with a
            `BadSampleWarning` (`"skip"`) or raises a `ValueError` (`"raise"`).
        cache_dir (`str` or `os.PathLike`, *optional*): where the rows are stored, see [`encode_image_codes`].

    Returns:
        `tuple[datasets.Dataset, FilterStats]`: the columns `caption`, `layout` and `image_path`, and the counts.
    """
    check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_ACTIONS)
    instances, captions = COCO(str(instances_file)), COCO(str(captions_file))
    stats = FilterStats()
    columns: dict[str, list] = {"caption": [], "layout": [], "image_path": []}
    for image_id in sorted(instances.imgs):
        texts = (a.get("caption") for a in captions.imgToAnns.get(image_id, []))
        caption = next((t.strip() for t in texts if isinstance(t, str) and t.strip()), None)
        if caption is None:
            continue
        stats.rows_in += 1
        info = instances.imgs[image_id]
        size = (info["width"], info["height"])
        try:
            entities = [
                Entity(clean_phrase(instances.cats[a["category_id"]]["name"]), boxes_from_coco_xywh(a["bbox"], *size))
                for a in instances.imgToAnns.get(image_id, [])
                if not a.get("iscrowd", 0)
            ]
            layout = finish_layout(caption, entities, min_box_area, max_entities, stats)
        except LayoutError as err:
            stats.bad_layouts += 1
            report_bad(f"COCO image {image_id} ({info['file_name']}): {err}", on_bad_sample)
            continue
        if layout is not None:
            columns["caption"].append(caption)
            columns["layout"].append(layout)
            columns["image_path"].append(os.path.join(image_dir, info["file_name"]))
    stats.rows_kept = len(columns["caption"])
    return file_backed(columns, "coco", cache_dir), stats
