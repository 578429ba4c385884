"""Synthetic COCO and LayoutSAM files, in the published formats, for runs without the real data (the dry run).

[`write_coco`] writes an instances JSON, a captions JSON and an image folder as COCO 2017 has them;
[`write_layoutsam`] writes LayoutSAM rows as JSON lines (`bbox_list` and region captions as stringified lists, as
published) and their images. The real loaders, [`load_coco`] and [`load_layoutsam`], read both. Phrases and
captions use the shapes words, so that the offline word-level tokenizer knows every word; images are random noise.
[`synthesize_missing`] writes either for a run's data arguments whose train paths do not exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from echogen_rl.data.shapes import make_caption, phrase_pool


def _random_layouts(
    rng: np.random.Generator, count: int, num_entities: int, width: int, height: int
) -> list[tuple[str, list[tuple[str, list[float]]]]]:
    """`count` (caption, [(phrase, pixel xyxy box)]) pairs; each box spans 15-50% of the width and the height."""
    phrases = phrase_pool()
    layouts = []
    for _ in range(count):
        entities = []
        for _ in range(num_entities):
            w, h = rng.uniform(0.15, 0.5) * width, rng.uniform(0.15, 0.5) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = [round(v, 1) for v in (x, y, x + w, y + h)]
            entities.append((phrases[rng.integers(len(phrases))], box))
        layouts.append((make_caption([p for p, _ in entities[:2]]), entities))
    return layouts


def _write_images(image_dir: Path, names: list[str], rng: np.random.Generator, width: int, height: int) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(image_dir / name, quality=90)


def write_coco(
    output_dir: str | os.PathLike,
    num_images: int,
    num_entities: int = 10,
    image_size: tuple[int, int] = (640, 480),
    seed: int = 0,
) -> dict[str, Path]:
    """Writes a COCO-format folder: `annotations/instances.json`, `annotations/captions.json`, `images/*.jpg`.

    Args:
        output_dir (`str` or `os.PathLike`): where to write.
        num_images (`int`): images, each with one caption and `num_entities` boxes.
        num_entities (`int`, *optional*, defaults to `10`): boxes per image (the shipped configs keep up to 10).
        image_size (`tuple[int, int]`, *optional*, defaults to `(640, 480)`): width and height, COCO's usual size.
        seed (`int`, *optional*, defaults to `0`): seed of the boxes and pixels.

    Returns:
        `dict[str, Path]`: `instances_file`, `captions_file` and `image_dir`, as [`load_coco`] takes them.
    """
    out, (width, height) = Path(output_dir), image_size
    rng = np.random.default_rng(seed)
    layouts = _random_layouts(rng, num_images, num_entities, width, height)
    categories = {p: i + 1 for i, p in enumerate(phrase_pool())}
    images, annotations, captions = [], [], []
    for image_id, (caption, entities) in enumerate(layouts, start=1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        captions.append({"id": image_id, "image_id": image_id, "caption": caption})
        for phrase, (x1, y1, x2, y2) in entities:
            bbox = [x1, y1, round(x2 - x1, 1), round(y2 - y1, 1)]  # COCO boxes are xywh in pixels
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[phrase],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    files = {
        "instances_file": out / "annotations" / "instances.json",
        "captions_file": out / "annotations" / "captions.json",
        "image_dir": out / "images",
    }
    files["instances_file"].parent.mkdir(parents=True, exist_ok=True)
    category_list = [{"id": i, "name": p, "supercategory": "shape"} for p, i in categories.items()]
    files["instances_file"].write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": category_list})
    )
    files["captions_file"].write_text(json.dumps({"images": images, "annotations": captions}))
    _write_images(files["image_dir"], [i["file_name"] for i in images], rng, width, height)
    return files


def write_layoutsam(
    output_dir: str | os.PathLike,
    num_rows: int,
    num_entities: int = 10,
    image_size: tuple[int, int] = (640, 480),
    seed: int = 0,
) -> dict[str, Path]:
    """Writes LayoutSAM rows to `train.jsonl` and their images to `images/`.

    Each row has LayoutSAM's published columns: `image_path` (relative to the image folder), `width`, `height`,
    `global_caption`, and `bbox_list`, `region_caption_list`, `detail_region_caption_list` as stringified lists.

    Args:
        output_dir (`str` or `os.PathLike`): where to write.
        num_rows (`int`): rows, each with its own image and `num_entities` regions.
        num_entities (`int`, *optional*, defaults to `10`): regions per row.
        image_size (`tuple[int, int]`, *optional*, defaults to `(640, 480)`): width and height of the images.
        seed (`int`, *optional*, defaults to `0`): seed of the boxes and pixels.

    Returns:
        `dict[str, Path]`: `file` and `image_dir`, as [`load_layoutsam`] takes them.
    """
    out, (width, height) = Path(output_dir), image_size
    rng = np.random.default_rng(seed)
    layouts = _random_layouts(rng, num_rows, num_entities, width, height)
    files = {"file": out / "train.jsonl", "image_dir": out / "images"}
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{i:08d}.jpg" for i in range(num_rows)]
    with files["file"].open("w") as rows:
        for name, (caption, entities) in zip(names, layouts):
            phrases = [p for p, _ in entities]
            row = {
                "image_path": name,
                "width": width,
                "height": height,
                "global_caption": caption,
                "bbox_list": str([box for _, box in entities]),
                "region_caption_list": str(phrases),
                "detail_region_caption_list": str([f"a {p}" for p in phrases]),
            }
            rows.write(json.dumps(row) + "\n")
    _write_images(files["image_dir"], names, rng, width, height)
    return files


def synthesize_missing(data_args, data_dir: Path, rows: int) -> dict[str, str]:
    """Writes `rows` synthetic rows to `data_dir` for a COCO or LayoutSAM source whose train paths do not exist.

    Args:
        data_args (`LayoutDataArguments`): the run's data arguments.
        data_dir (`Path`): where to write.
        rows (`int`): rows (images) to write.

    Returns:
        `dict[str, str]`: the data arguments to override with the synthetic paths; empty if the paths exist (or the
        source is shapes).
    """
    if data_args.dataset == "coco":
        names = ("instances_file", "captions_file", "image_dir")
        if all(Path(getattr(data_args, f"coco_{n}")).exists() for n in names):
            return {}
        files = write_coco(data_dir / "coco", rows, data_args.max_entities)
        return {f"coco_{n}": str(files[n]) for n in names}
    if data_args.dataset == "layoutsam" and not Path(data_args.layoutsam_file).exists():
        files = write_layoutsam(data_dir / "layoutsam", rows, data_args.max_entities)
        return {"layoutsam_file": str(files["file"]), "layoutsam_image_dir": str(files["image_dir"])}
    return {}
