"""The layouts a published benchmark generates from, read from its official files by its protocol.

- **COCO** (InstanceDiffusion's protocol): every val2017 image with a caption, in sorted id order; its first
  caption; at most 30 boxes (the largest, in annotation order), no area filter, crowd annotations left out.
  Generated images are named `{image_id:012d}.png`, COCO's file stem.
- **LayoutSAM-Eval** (CreatiLayout's protocol): every row and every box; the prompt's phrases are the detailed
  region captions; generated images take the row's `file_name`, as the original scorer opens them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from echogen_rl.data.coco import load_coco
from echogen_rl.data.layoutsam import read_layoutsam_eval
from echogen_rl.layout import Entity, Layout

COCO_MAX_BOXES = 30


@dataclass
class BenchmarkItem:
    """One layout of a benchmark.

    Attributes:
        name (`str`): the generated image's file name, as the protocol names it.
        layout (`Layout`): the prompt: global caption and boxes.
        real_image (`object`): the real image of the same layout (a path or an embedded image), for FID; `None`
            when the benchmark ships none.
        image_id (`int`, *optional*): COCO's image id, which detector results name images by.
        regions (`list[dict]`, *optional*): LayoutSAM-Eval's `{"description", "detail", "box"}` per box, for the
            judge.
    """

    name: str
    layout: Layout
    real_image: object = None
    image_id: int | None = None
    regions: list[dict] | None = field(default=None, repr=False)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")


def coco_items(
    instances_file: str | os.PathLike,
    captions_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    limit: int | None = None,
) -> tuple[list[BenchmarkItem], dict[int, str]]:
    """COCO val2017's layouts by InstanceDiffusion's protocol, and its categories (id -> name).

    Args:
        instances_file (`str` or `os.PathLike`): `instances_val2017.json`.
        captions_file (`str` or `os.PathLike`): `captions_val2017.json`.
        image_dir (`str` or `os.PathLike`): the `val2017` images (the real images of FID).
        limit (`int`, *optional*): the first `limit` layouts only, a subset for a quick look.

    Raises:
        `ValueError`: a malformed record (the benchmark skips nothing); the message names the file, record and field.
    """
    _check_limit(limit)
    rows, _ = load_coco(
        instances_file, captions_file, image_dir, min_box_area=0.0, max_entities=COCO_MAX_BOXES, on_bad_sample="raise"
    )
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    with open(instances_file, encoding="utf-8") as f:
        instances = json.load(f)
    # load_coco has checked every record it kept, so its image's id and file name are there and valid.
    ids = {image["file_name"]: image["id"] for image in instances["images"] if isinstance(image, dict)}
    categories = {c["id"]: " ".join(c["name"].split()) for c in instances["categories"]}
    items = []
    for row in rows:
        image_id = ids[os.path.relpath(row["image_path"], image_dir)]
        items.append(
            BenchmarkItem(f"{image_id:012d}.png", Layout.from_json(row["layout"]), row["image_path"], image_id)
        )
    return items, categories


def layoutsam_items(
    rows: str | os.PathLike | datasets.Dataset, image_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[BenchmarkItem]:
    """LayoutSAM-Eval's layouts by CreatiLayout's protocol (see [`read_layoutsam_eval`]). Relative image paths are
    relative to `image_dir`, by default to the rows file's folder.

    Raises:
        `ValueError`: a malformed row, named by index and field; or two rows with one `file_name`.
    """
    _check_limit(limit)
    if image_dir is None and isinstance(rows, (str, os.PathLike)):
        image_dir = Path(rows).parent
    records = read_layoutsam_eval(rows, image_dir)[:limit]
    seen: dict[str, int] = {}
    items = []
    for index, record in enumerate(records):
        if record["file_name"] in seen:
            raise ValueError(
                f"LayoutSAM-Eval rows {seen[record['file_name']]} and {index} share file_name {record['file_name']!r}"
            )
        seen[record["file_name"]] = index
        entities = [Entity(r["detail"], tuple(r["box"])) for r in record["regions"]]
        items.append(
            BenchmarkItem(
                record["file_name"], Layout(entities, record["caption"]), record["image"], None, record["regions"]
            )
        )
    return items
