"""Data sources of the training stages: procedural shapes, COCO and LayoutSAM.

Every source ends as a `datasets.Dataset` with the columns `caption`, `layout` (JSON of a `Layout`, normalized xyxy
boxes) and `image_codes` (the image as a flat list of VQ codes); training code reads only those three. COCO and
LayoutSAM take two steps: a loader ([`load_coco`], [`load_layoutsam`]) turns annotations into filtered layouts with
an image reference, then [`encode_image_codes`] turns the images into codes. [`build_layout_datasets`] runs both for
a [`LayoutDataArguments`]. Each step counts what it dropped in a [`FilterStats`].
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import datasets
from datasets.fingerprint import Hasher
from PIL import Image
from pycocotools.coco import COCO

from echogen_rl.data.shapes import ShapesConfig, build_shapes_dataset
from echogen_rl.image_tokenizers import ImageTokenizer
from echogen_rl.layout import Entity, Layout, LayoutError, boxes_from_coco_xywh, boxes_from_pixel_xyxy, validate_layout

logger = logging.getLogger(__name__)

DATASETS = ("shapes", "coco", "layoutsam")
BAD_SAMPLE_ACTIONS = ("skip", "raise")
# Added to the seed of the shapes train split to seed its eval split; far from any small seed a user would pick.
EVAL_SEED_OFFSET = 1_000_003
# LayoutSAM names its region captions differently in the train set and the eval benchmark; the first present wins.
REGION_CAPTION_COLUMNS = (
    "detail_region_caption_list",
    "region_caption_list",
    "detail_region_captions",
    "region_captions",
)
_FEATURES = {
    "caption": datasets.Value("string"),
    "layout": datasets.Value("string"),
    "image_path": datasets.Value("string"),
    "image": datasets.Image(),
}


class BadSampleWarning(UserWarning):
    """A sample skipped because its layout or image is unusable (`on_bad_sample="skip"`)."""


@dataclass
class LayoutDataArguments:
    """Which data the layout tasks train and evaluate on, as script arguments (`transformers.HfArgumentParser`).

    Args:
        dataset (`str`, *optional*, defaults to `"shapes"`): `"shapes"`, `"coco"` or `"layoutsam"`.
        num_train_samples (`int` or `None`, *optional*, defaults to `2048`): shapes: the number generated;
            COCO and LayoutSAM: a cap on the train rows (`None`: all).
        num_eval_samples (`int`, *optional*, defaults to `64`): eval rows: generated (shapes), split off the end of
            train (no eval files), or a cap on the eval files; `0` disables evaluation.
        dataset_seed (`int`, *optional*, defaults to `0`): shapes seed; eval uses `dataset_seed + EVAL_SEED_OFFSET`.
        shapes_grid_size (`int`, *optional*, defaults to `8`): shapes cells per image side.
        shapes_max_shapes (`int`, *optional*, defaults to `3`): most shapes per shapes image.
        coco_instances_file, coco_captions_file, coco_image_dir (`str`, *optional*): COCO instances JSON, captions
            JSON and image directory, required for `"coco"`.
        coco_eval_instances_file, coco_eval_captions_file, coco_eval_image_dir (`str`, *optional*): the same for
            eval, all or none; without them eval rows are split off the end of train.
        layoutsam_file (`str`, *optional*): LayoutSAM rows (`.jsonl`, `.json`, `.parquet` or a directory saved with
            `Dataset.save_to_disk`), required for `"layoutsam"`.
        layoutsam_image_dir (`str`, *optional*): directory that relative LayoutSAM image paths are relative to.
        layoutsam_eval_file (`str`, *optional*): LayoutSAM eval rows; without it eval rows are split off train.
        min_box_area (`float`, *optional*, defaults to `0.002`): boxes under this fraction of the image are dropped.
        max_entities (`int`, *optional*, defaults to `10`): most entities per layout; the largest boxes are kept.
        on_bad_sample (`str`, *optional*, defaults to `"skip"`): an unusable layout or image is skipped with a
            `BadSampleWarning` (`"skip"`) or raises a `ValueError` (`"raise"`).
        vq_batch_size (`int`, *optional*, defaults to `16`): images per image tokenizer call.
        cache_dir (`str`, *optional*): cache of loaded rows and image codes; defaults to `echogen_rl` under the
            `datasets` cache.
    """

    dataset: str = field(default="shapes", metadata={"help": "Data source.", "choices": list(DATASETS)})
    num_train_samples: int | None = field(
        default=2048, metadata={"help": "Shapes: images generated. COCO/LayoutSAM: cap on train rows (None: all)."}
    )
    num_eval_samples: int = field(default=64, metadata={"help": "Eval rows (generated, split off or a cap); 0: none."})
    dataset_seed: int = field(default=0, metadata={"help": "Shapes seed; eval uses dataset_seed + 1_000_003."})
    shapes_grid_size: int = field(default=8, metadata={"help": "Shapes cells per image side."})
    shapes_max_shapes: int = field(default=3, metadata={"help": "Most shapes per shapes image."})
    coco_instances_file: str | None = field(default=None, metadata={"help": "COCO instances JSON."})
    coco_captions_file: str | None = field(default=None, metadata={"help": "COCO captions JSON."})
    coco_image_dir: str | None = field(default=None, metadata={"help": "COCO image directory."})
    coco_eval_instances_file: str | None = field(default=None, metadata={"help": "COCO eval instances JSON."})
    coco_eval_captions_file: str | None = field(default=None, metadata={"help": "COCO eval captions JSON."})
    coco_eval_image_dir: str | None = field(default=None, metadata={"help": "COCO eval image directory."})
    layoutsam_file: str | None = field(default=None, metadata={"help": "LayoutSAM .jsonl/.json/.parquet or dir."})
    layoutsam_image_dir: str | None = field(default=None, metadata={"help": "Base of relative LayoutSAM paths."})
    layoutsam_eval_file: str | None = field(default=None, metadata={"help": "LayoutSAM eval rows."})
    min_box_area: float = field(default=0.002, metadata={"help": "Drop boxes under this fraction of the image."})
    max_entities: int = field(default=10, metadata={"help": "Most entities per layout (the largest are kept)."})
    on_bad_sample: str = field(
        default="skip", metadata={"help": "Bad layout or image: skip or raise.", "choices": list(BAD_SAMPLE_ACTIONS)}
    )
    vq_batch_size: int = field(default=16, metadata={"help": "Images per image tokenizer call."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of loaded rows and image codes."})

    def __post_init__(self):
        _check_choice("dataset", self.dataset, DATASETS)
        _check_choice("on_bad_sample", self.on_bad_sample, BAD_SAMPLE_ACTIONS)
        _check_int("num_train_samples", self.num_train_samples, 1, optional=self.dataset != "shapes")
        for name, minimum in (("num_eval_samples", 0), ("dataset_seed", 0), ("shapes_grid_size", 1)):
            _check_int(name, getattr(self, name), minimum)
        for name in ("shapes_max_shapes", "max_entities", "vq_batch_size"):
            _check_int(name, getattr(self, name), 1)
        area = self.min_box_area
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not 0 <= area < 1:
            raise ValueError(f"min_box_area must be a fraction in [0, 1), got {area!r}")
        if self.dataset == "shapes":
            try:
                self.shapes_config()
            except ValueError as err:
                raise ValueError(f"shapes_grid_size / shapes_max_shapes: {err}") from None
        elif self.dataset == "coco":
            _check_paths(self, ("coco_instances_file", "coco_captions_file", "coco_image_dir"), required=True)
            _check_paths(self, ("coco_eval_instances_file", "coco_eval_captions_file", "coco_eval_image_dir"))
        else:
            _check_paths(self, ("layoutsam_file",), required=True)

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(grid_size=self.shapes_grid_size, max_shapes=self.shapes_max_shapes)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def _check_paths(args: LayoutDataArguments, names: tuple[str, ...], required: bool = False) -> None:
    """All of `names` must be set: always when `required`, else as soon as one of them is."""
    missing = [name for name in names if not getattr(args, name)]
    if missing and (required or len(missing) < len(names)):
        raise ValueError(f"dataset={args.dataset!r} needs {', '.join(names)}; missing {', '.join(missing)}")


@dataclass
class FilterStats:
    """What the data steps read, kept and dropped; `rows_in` is `rows_kept` plus the four row counters.

    Args:
        rows_in, rows_kept (`int`): rows read (COCO: captioned images) and rows left.
        tiny_boxes_dropped, entities_capped (`int`): entities dropped under `min_box_area` and over `max_entities`.
        empty_layouts_dropped, bad_layouts, bad_images (`int`): rows dropped for having no entity left, for an
            invalid or unparseable layout, and for an unreadable image.
        rows_beyond_limit (`int`): rows left out by `num_train_samples` / `num_eval_samples`.
    """

    rows_in: int = 0
    rows_kept: int = 0
    tiny_boxes_dropped: int = 0
    entities_capped: int = 0
    empty_layouts_dropped: int = 0
    bad_layouts: int = 0
    bad_images: int = 0
    rows_beyond_limit: int = 0

    def __add__(self, other: FilterStats) -> FilterStats:
        """The stats of two disjoint sets of rows, e.g. a train and an eval file."""
        return FilterStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def summary(self) -> str:
        return (
            f"kept {self.rows_kept} of {self.rows_in} rows; rows dropped: {self.empty_layouts_dropped} empty layouts, "
            f"{self.bad_layouts} bad layouts, {self.bad_images} bad images, {self.rows_beyond_limit} beyond the "
            f"sample limit; entities dropped: {self.tiny_boxes_dropped} tiny boxes, {self.entities_capped} over "
            "max_entities"
        )


def _report_bad(message: str, on_bad_sample: str) -> None:
    if on_bad_sample == "raise":
        raise ValueError(message)
    warnings.warn(f"skipped: {message}", BadSampleWarning, stacklevel=3)


def _area(box: tuple[float, float, float, float]) -> float:
    # Inverted and NaN boxes count as empty (max(0.0, nan) is 0.0), so they fall under any positive min_box_area.
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _phrase(value: object) -> object:
    # Layout text is parsed back whitespace-normalized, so phrases are stored that way to round-trip exactly.
    return " ".join(value.split()) if isinstance(value, str) else value


def _finish_layout(
    caption: str, entities: list[Entity], min_box_area: float, max_entities: int, stats: FilterStats
) -> str | None:
    """The filtered layout as JSON, or `None` when no entity is left; raises `LayoutError` if it is invalid."""
    kept = [e for e in entities if _area(e.box) >= min_box_area]
    stats.tiny_boxes_dropped += len(entities) - len(kept)
    if len(kept) > max_entities:
        stats.entities_capped += len(kept) - max_entities
        # sorted() is stable: among equal areas the earlier entity wins.
        largest = sorted(range(len(kept)), key=lambda i: -_area(kept[i].box))[:max_entities]
        kept = [kept[i] for i in sorted(largest)]
    if not kept:
        stats.empty_layouts_dropped += 1
        return None
    layout = Layout(kept, caption)
    validate_layout(layout)
    return layout.to_json()


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "echogen_rl"


def _file_backed(columns: dict[str, list], name: str, cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    """The rows as a dataset stored under `cache_dir`, so that `Dataset.map` caches what is computed from it.

    `datasets` only writes map caches next to a dataset's files, and an in-memory dataset has none. The directory is
    named by the content fingerprint of the rows: the same rows always load the same files, hence the same
    fingerprint, which is what makes later map caches hit.
    """
    in_memory = datasets.Dataset.from_dict(columns, features=datasets.Features({k: _FEATURES[k] for k in columns}))
    if len(in_memory) == 0:  # nothing to cache, and `datasets` cannot load an empty saved dataset back
        return in_memory
    root = _cache_root(cache_dir)
    path = root / f"{name}-{in_memory._fingerprint}"
    if not (path / "state.json").exists():
        tmp = root / f"{path.name}.tmp-{os.getpid()}"
        in_memory.save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another process (e.g. another rank) saved the same rows first
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))


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
    _check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_ACTIONS)
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
                Entity(_phrase(instances.cats[a["category_id"]]["name"]), boxes_from_coco_xywh(a["bbox"], *size))
                for a in instances.imgToAnns.get(image_id, [])
                if not a.get("iscrowd", 0)
            ]
            layout = _finish_layout(caption, entities, min_box_area, max_entities, stats)
        except LayoutError as err:
            stats.bad_layouts += 1
            _report_bad(f"COCO image {image_id} ({info['file_name']}): {err}", on_bad_sample)
            continue
        if layout is not None:
            columns["caption"].append(caption)
            columns["layout"].append(layout)
            columns["image_path"].append(os.path.join(image_dir, info["file_name"]))
    stats.rows_kept = len(columns["caption"])
    return _file_backed(columns, "coco", cache_dir), stats


def _literal(value: object, name: str) -> object:
    """A value that may be stringified (JSON or a Python literal, as LayoutSAM stores lists), parsed without eval."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise LayoutError(f"{name} cannot be parsed ({type(err).__name__}): {shown!r}") from None


def _literal_list(value: object, name: str) -> list:
    value = _literal(value, name)
    if not isinstance(value, (list, tuple)):
        raise LayoutError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _layoutsam_regions(row: dict, metadata: dict) -> list[tuple[object, object]]:
    """The `(phrase, pixel xyxy box)` pairs of a LayoutSAM row, in either published form."""
    if row.get("bbox_list") is not None:
        boxes = _literal_list(row["bbox_list"], "bbox_list")
        column = next((c for c in REGION_CAPTION_COLUMNS if row.get(c) is not None), None)
        if column is None:
            raise LayoutError(f"bbox_list without region captions ({', '.join(REGION_CAPTION_COLUMNS)})")
        phrases = _literal_list(row[column], column)
        if len(phrases) != len(boxes):
            raise LayoutError(f"{column} has {len(phrases)} items but bbox_list has {len(boxes)}")
        return list(zip(phrases, boxes))
    if metadata.get("bbox_info") is None:
        raise LayoutError("neither bbox_list nor metadata.bbox_info is present")
    items = _literal_list(metadata["bbox_info"], "metadata.bbox_info")
    if not all(isinstance(item, dict) and {"bbox", "description"} <= item.keys() for item in items):
        raise LayoutError("metadata.bbox_info items must be objects with 'bbox' and 'description'")
    return [(item["description"], item["bbox"]) for item in items]


def _pixel_box(box: object, width: float, height: float, index: int) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise LayoutError(f"entity {index}: box must be 4 numbers [x1, y1, x2, y2], got {box!r}") from None
    return boxes_from_pixel_xyxy((x1, y1, x2, y2), width, height)


def _declared_size(row: dict, metadata: dict) -> tuple[float, float] | None:
    """The image `(width, height)` given by the row or its metadata, or `None` when neither gives both."""
    for source in (row, metadata):
        width, height = source.get("width"), source.get("height")
        if width is not None and height is not None:
            try:
                return float(width), float(height)
            except (TypeError, ValueError):
                raise LayoutError(f"width and height must be numbers, got {width!r} and {height!r}") from None
    return None


def _image_ref(row: dict, image_dir: str | os.PathLike | None) -> object:
    """A row's image as a path string, an embedded image (a `{"bytes", "path"}` dict) or `None`."""
    value = row.get("image_path")
    if value is None:
        value = row.get("image")
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)):
        return os.path.join(image_dir, value) if image_dir is not None else os.fspath(value)
    return value


def _open_image(ref: object) -> Image.Image:
    """Opens a path or an embedded image lazily: only the header is read until the pixels are used."""
    if isinstance(ref, dict) and ref.get("bytes"):
        return Image.open(io.BytesIO(ref["bytes"]))
    if isinstance(ref, str):
        return Image.open(ref)
    raise ValueError(f"no image (got {type(ref).__name__})")


class _UnreadableImage(Exception):
    pass


def _image_size(ref: object, index: int) -> tuple[int, int]:
    try:
        with _open_image(ref) as image:
            return image.size
    except Exception as err:  # PIL raises many exception types on malformed files
        raise _UnreadableImage(f"{_describe(ref, index)}: cannot read the image size: {err}") from err


def _describe(ref: object, index: int) -> str:
    path = ref if isinstance(ref, str) else ref.get("path") if isinstance(ref, dict) else None
    return f"row {index} ({path})" if path else f"row {index}"


def _read_rows(source: str | os.PathLike | datasets.Dataset, cache_dir: str | os.PathLike | None) -> Iterator[Any]:
    """The rows of a LayoutSAM source; an unparseable JSON line comes as a `LayoutError` so it counts as a bad row."""
    if isinstance(source, datasets.Dataset):
        dataset = source
    else:
        path = Path(source)
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if not isinstance(dataset, datasets.Dataset):
                raise ValueError(f"{path} holds a DatasetDict; pass the directory of one split")
        elif path.suffix == ".parquet":
            dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(_cache_root(cache_dir)))
        elif path.suffix == ".json" and (text := path.read_text(encoding="utf-8")).lstrip().startswith("["):
            yield from json.loads(text)
            return
        elif path.suffix in (".json", ".jsonl"):
            with path.open(encoding="utf-8") as lines:
                for line in (line for line in lines if line.strip()):
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        yield LayoutError(f"line is not valid JSON: {err}")
            return
        else:
            raise ValueError(f"unsupported LayoutSAM source {path}: expected .jsonl, .json, .parquet or a directory")
    # Decoding every image only to read annotations would be slow: images are opened when their size is needed.
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    yield from dataset


def load_layoutsam(
    file_or_dir: str | os.PathLike | datasets.Dataset,
    image_dir: str | os.PathLike | None = None,
    min_box_area: float = 0.002,
    max_entities: int = 10,
    on_bad_sample: str = "skip",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, FilterStats]:
    """Loads LayoutSAM rows as published, in either form, as layouts.

    - Columns `global_caption`, `bbox_list` (`[x1, y1, x2, y2]` pixel boxes) and region captions (the first present
      of `REGION_CAPTION_COLUMNS`); the lists may be real or stringified (JSON or Python literals, never `eval`ed).
    - A `metadata` column (an object or its JSON) whose `bbox_info` lists `{"bbox": [x1, y1, x2, y2], "description"}`.

    The image comes from `image_path` or `image` (a path or a `datasets.Image`); its size from the `width` and
    `height` columns (or metadata fields), else from the image file's header.

    Args:
        file_or_dir (`str`, `os.PathLike` or `datasets.Dataset`): a `.jsonl`, `.json` or `.parquet` file, a
            directory saved with `Dataset.save_to_disk`, or the rows themselves.
        image_dir (`str` or `os.PathLike`, *optional*): directory that relative image paths are relative to.
        min_box_area (`float`, *optional*, defaults to `0.002`): boxes under this fraction of the image are dropped.
        max_entities (`int`, *optional*, defaults to `10`): most entities per layout; the largest are kept in order.
        on_bad_sample (`str`, *optional*, defaults to `"skip"`): a row with an invalid layout or an unreadable image
            is skipped with a `BadSampleWarning` naming its index (`"skip"`) or raises a `ValueError` (`"raise"`).
        cache_dir (`str` or `os.PathLike`, *optional*): where the rows are stored, see [`encode_image_codes`].

    Returns:
        `tuple[datasets.Dataset, FilterStats]`: the columns `caption`, `layout` and `image_path` and/or `image`
        (whichever the rows use), and the counts.
    """
    _check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_ACTIONS)
    stats = FilterStats()
    rows: dict[str, list] = {"caption": [], "layout": [], "image_path": [], "image": []}
    for index, row in enumerate(_read_rows(file_or_dir, cache_dir)):
        stats.rows_in += 1
        try:
            if isinstance(row, LayoutError):
                raise row
            if not isinstance(row, dict):
                raise LayoutError(f"a row must be an object, got {type(row).__name__}")
            metadata = _literal(row.get("metadata"), "metadata") or {}
            if not isinstance(metadata, dict):
                raise LayoutError(f"metadata must be an object, got {type(metadata).__name__}")
            caption = row.get("global_caption") or metadata.get("global_caption") or metadata.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise LayoutError(f"no global caption (got {caption!r})")
            regions = _layoutsam_regions(row, metadata)
            ref = _image_ref(row, image_dir)
            size = _declared_size(row, metadata) or _image_size(ref, index)
            entities = [Entity(_phrase(p), _pixel_box(b, *size, i)) for i, (p, b) in enumerate(regions)]
            layout = _finish_layout(caption.strip(), entities, min_box_area, max_entities, stats)
        except LayoutError as err:
            stats.bad_layouts += 1
            _report_bad(f"LayoutSAM row {index}: {err}", on_bad_sample)
            continue
        except _UnreadableImage as err:
            stats.bad_images += 1
            _report_bad(f"LayoutSAM {err}", on_bad_sample)
            continue
        if layout is not None:
            rows["caption"].append(caption.strip())
            rows["layout"].append(layout)
            rows["image_path"].append(ref if isinstance(ref, str) else None)
            rows["image"].append(None if isinstance(ref, str) else ref)
    stats.rows_kept = len(rows["caption"])
    # Keep only the image columns the rows use, so path-only data carries no empty image column and vice versa.
    columns = {k: v for k, v in rows.items() if k in ("caption", "layout") or any(x is not None for x in v)}
    return _file_backed(columns, "layoutsam", cache_dir), stats


def encode_image_codes(
    dataset: datasets.Dataset,
    image_tokenizer: ImageTokenizer,
    batch_size: int = 16,
    on_bad_sample: str = "skip",
    cache_key: str | None = None,
) -> tuple[datasets.Dataset, FilterStats]:
    """Adds the column `image_codes`: each row's image (from `image_path`, else `image`) encoded in batches.

    An image that cannot be read (missing, corrupted) drops its row alone, never its batch. The codes are cached by
    `datasets` next to the dataset's files under a fingerprint of `dataset._fingerprint` and `cache_key`, so a second
    call on the same rows with the same key encodes nothing. The fingerprint is not left to `datasets`, which would
    hash the map function and with it the tokenizer's model: slow, and not stable across runs. Datasets held in
    memory are never cached, which is why [`load_coco`] and [`load_layoutsam`] return file-backed ones.

    Args:
        dataset (`datasets.Dataset`): rows with an `image_path` or `image` column.
        image_tokenizer (`ImageTokenizer`): encodes a list of RGB images to codes `[B, N]`.
        batch_size (`int`, *optional*, defaults to `16`): images per `image_tokenizer.encode` call.
        on_bad_sample (`str`, *optional*, defaults to `"skip"`): an unreadable image drops its row with a
            `BadSampleWarning` naming the file or row (`"skip"`), or raises a `ValueError` naming it (`"raise"`).
        cache_key (`str`, *optional*): identifies the tokenizer and its weights (e.g. model path, grid and codebook
            size): tokenizers with the same key must give the same codes. `None` disables caching.

    Returns:
        `tuple[datasets.Dataset, FilterStats]`: the rows whose image was read, with `image_codes`, and the counts.
    """
    _check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_ACTIONS)
    _check_int("batch_size", batch_size, 1)
    image_columns = [c for c in ("image_path", "image") if c in dataset.column_names]
    if not image_columns:
        raise ValueError(f"the dataset has no image_path or image column (columns: {dataset.column_names})")
    # Decoding is done here rather than by `datasets`, which would fail the whole map on the first corrupted image.
    decoded_feature = dataset.features.get("image")
    if isinstance(decoded_feature, datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        refs = [next((v for v in values if v is not None), None) for values in zip(*(batch[c] for c in image_columns))]
        images: list[Image.Image | None] = []
        errors: list[str] = []
        for ref, index in zip(refs, indices):
            try:
                with _open_image(ref) as image:
                    images.append(image.convert("RGB"))  # convert() decodes every pixel, so errors surface here
                errors.append("")
            except Exception as err:  # PIL raises many exception types on malformed files
                message = f"cannot read the image of {_describe(ref, index)}: {type(err).__name__}: {err}"
                if on_bad_sample == "raise":
                    raise ValueError(message) from err
                images.append(None)
                errors.append(message)
        good = [image for image in images if image is not None]
        codes = iter(image_tokenizer.encode(good).tolist() if good else [])
        return {"image_codes": [next(codes) if image is not None else [] for image in images], "image_error": errors}

    features = dataset.features.copy()
    features["image_codes"] = datasets.List(datasets.Value("int64"))
    features["image_error"] = datasets.Value("string")
    cached = cache_key is not None
    encoded = dataset.map(
        encode_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        features=features,
        desc="VQ encode",
        new_fingerprint=Hasher.hash((dataset._fingerprint, cache_key)) if cached else None,
        keep_in_memory=not cached,
        load_from_cache_file=cached,
    )
    # Bad rows are reported after the map, not inside it, so that a cache hit warns (or raises) about them as well.
    stats = FilterStats(rows_in=len(encoded))
    errors = list(encoded["image_error"])
    for message in filter(None, errors):
        stats.bad_images += 1
        _report_bad(message, on_bad_sample)
    if stats.bad_images:
        encoded = encoded.select([i for i, message in enumerate(errors) if not message])
    encoded = encoded.remove_columns("image_error")
    if isinstance(decoded_feature, datasets.Image):
        encoded = encoded.cast_column("image", decoded_feature)
    stats.rows_kept = len(encoded)
    return encoded, stats


def _load(args: LayoutDataArguments, split: str) -> tuple[datasets.Dataset, FilterStats]:
    filters = {k: getattr(args, k) for k in ("min_box_area", "max_entities", "on_bad_sample", "cache_dir")}
    if args.dataset == "coco":
        prefix = "coco_eval" if split == "eval" else "coco"
        files = (getattr(args, f"{prefix}_{name}") for name in ("instances_file", "captions_file", "image_dir"))
        return load_coco(*files, **filters)
    source = args.layoutsam_eval_file if split == "eval" else args.layoutsam_file
    return load_layoutsam(source, args.layoutsam_image_dir, **filters)


def _limit(dataset: datasets.Dataset, limit: int | None, stats: FilterStats) -> datasets.Dataset:
    if limit is None or len(dataset) <= limit:
        return dataset
    stats.rows_beyond_limit += len(dataset) - limit
    return dataset.select(range(limit))


def _check_train(name: str, splits: list[datasets.Dataset], stats: FilterStats, when: str) -> None:
    if len(splits[0]) == 0:
        raise ValueError(
            f"The {name} train set is empty {when} ({sum(map(len, splits[1:]))} rows went to eval): "
            f"{stats.summary()}. Check the data paths, min_box_area and max_entities."
        )


def build_layout_datasets(
    args: LayoutDataArguments, image_tokenizer: ImageTokenizer | None = None, cache_key: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None, FilterStats]:
    """The train and eval datasets of `args`, with at least the columns `caption`, `layout` and `image_codes`.

    Shapes come with their codes. COCO and LayoutSAM are loaded, filtered, limited to `num_train_samples` /
    `num_eval_samples` and encoded. Without eval files the last `num_eval_samples` rows are the eval split, taken
    before the train limit so that the splits never overlap.

    Args:
        args (`LayoutDataArguments`): the data to build.
        image_tokenizer (`ImageTokenizer`, *optional*): encodes COCO and LayoutSAM images (required for them).
        cache_key (`str`, *optional*): identifies the tokenizer for the code cache, see [`encode_image_codes`].

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset | None, FilterStats]`: train, eval (`None` when
        `num_eval_samples` is 0 or no row is left) and the counts over both.

    Raises:
        `ValueError`: if no train row is left, checked before encoding and again after dropping unreadable images.
    """
    if args.dataset == "shapes":
        config, eval_dataset = args.shapes_config(), None
        train = build_shapes_dataset(args.num_train_samples, args.dataset_seed, config)
        if args.num_eval_samples:
            eval_dataset = build_shapes_dataset(args.num_eval_samples, args.dataset_seed + EVAL_SEED_OFFSET, config)
        rows = args.num_train_samples + args.num_eval_samples
        stats = FilterStats(rows_in=rows, rows_kept=rows)
        logger.info("shapes data: %s", stats.summary())
        return train, eval_dataset, stats
    if image_tokenizer is None:
        raise ValueError(f"dataset={args.dataset!r} needs an image_tokenizer to encode its images")

    train, stats = _load(args, "train")
    separate_eval = bool(args.coco_eval_instances_file if args.dataset == "coco" else args.layoutsam_eval_file)
    eval_dataset = None
    if args.num_eval_samples and separate_eval:
        eval_dataset, eval_stats = _load(args, "eval")
        stats += eval_stats
        eval_dataset = _limit(eval_dataset, args.num_eval_samples, stats)
    elif args.num_eval_samples:
        split = max(0, len(train) - args.num_eval_samples)
        eval_dataset, train = train.select(range(split, len(train))), train.select(range(split))
    train = _limit(train, args.num_train_samples, stats)

    splits = [train] + ([eval_dataset] if eval_dataset is not None and len(eval_dataset) else [])
    stats.rows_kept = sum(map(len, splits))
    _check_train(args.dataset, splits, stats, "after filtering the annotations")
    for i, dataset in enumerate(splits):
        splits[i], encode_stats = encode_image_codes(
            dataset, image_tokenizer, args.vq_batch_size, args.on_bad_sample, cache_key
        )
        stats.bad_images += encode_stats.bad_images
        stats.rows_kept -= encode_stats.bad_images
    _check_train(args.dataset, splits, stats, "after dropping unreadable images")
    logger.info("%s data: %s", args.dataset, stats.summary())
    return splits[0], (splits[1] if len(splits) > 1 and len(splits[1]) else None), stats
