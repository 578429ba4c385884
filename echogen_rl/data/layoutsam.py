"""LayoutSAM as layouts: [`load_layoutsam`] reads rows in either published form (`bbox_list` with region captions, or
`metadata.bbox_info`), from JSON lines, JSON, parquet, a saved dataset or a `datasets.Dataset`, into filtered
layouts with their image (a path or embedded bytes); [`encode_image_codes`] then turns the images into codes."""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from echogen_rl.data.common import (
    BAD_SAMPLE_ACTIONS,
    FilterStats,
    cache_root,
    check_choice,
    clean_phrase,
    describe_image,
    file_backed,
    finish_layout,
    finite_numbers,
    open_image,
    report_bad,
)
from echogen_rl.layout import Entity, LayoutError, boxes_from_pixel_xyxy

# LayoutSAM names its region captions differently in the train set and the eval benchmark; the first present wins.
REGION_CAPTION_COLUMNS = (
    "detail_region_caption_list",
    "region_caption_list",
    "detail_region_captions",
    "region_captions",
)


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
    # A NaN, an infinity, a bool or a string among the numbers is refused, never clipped into the image.
    x1, y1, x2, y2 = finite_numbers(box, 4, f"entity {index}: box [x1, y1, x2, y2]")
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


class _UnreadableImage(Exception):
    pass


def _image_size(ref: object, index: int) -> tuple[int, int]:
    try:
        with open_image(ref) as image:
            return image.size
    except Exception as err:  # PIL raises many exception types on malformed files
        raise _UnreadableImage(f"{describe_image(ref, index)}: cannot read the image size: {err}") from err


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
            dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_root(cache_dir)))
        elif path.suffix == ".json" and (text := path.read_text(encoding="utf-8")).lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            yield from rows
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
    check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_ACTIONS)
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
            entities = [Entity(clean_phrase(p), _pixel_box(b, *size, i)) for i, (p, b) in enumerate(regions)]
            layout = finish_layout(caption.strip(), entities, min_box_area, max_entities, stats)
        except LayoutError as err:
            stats.bad_layouts += 1
            report_bad(f"LayoutSAM row {index}: {err}", on_bad_sample)
            continue
        except _UnreadableImage as err:
            stats.bad_images += 1
            report_bad(f"LayoutSAM {err}", on_bad_sample)
            continue
        if layout is not None:
            rows["caption"].append(caption.strip())
            rows["layout"].append(layout)
            rows["image_path"].append(ref if isinstance(ref, str) else None)
            rows["image"].append(None if isinstance(ref, str) else ref)
    stats.rows_kept = len(rows["caption"])
    # Keep only the image columns the rows use, so path-only data carries no empty image column and vice versa.
    columns = {k: v for k, v in rows.items() if k in ("caption", "layout") or any(x is not None for x in v)}
    return file_backed(columns, "layoutsam", cache_dir), stats


def read_layoutsam_eval(
    source: str | os.PathLike | datasets.Dataset, image_dir: str | os.PathLike | None = None
) -> list[dict]:
    """LayoutSAM-Eval rows as its scorer reads them: every row and every box, with no filter (the benchmark scores
    all of them), so a bad row raises instead of being skipped.

    A row holds `global_caption`, `bbox_list` (`[x1, y1, x2, y2]` pixel boxes), `region_caption_list` (the short
    descriptions the judge is asked about), `detail_region_caption_list` (the detailed captions the attribute
    questions quote; the short ones when absent), `file_name`, and the real image (`image_path` or `image`) with
    its `width` and `height` (else read from the image's header).

    Args:
        source (`str`, `os.PathLike` or `datasets.Dataset`): a `.jsonl`, `.json` or `.parquet` file, a saved
            dataset directory, or the rows themselves.
        image_dir (`str` or `os.PathLike`, *optional*): directory that relative image paths are relative to.

    Returns:
        `list[dict]`: per row `file_name` (the row's, else `{index:05d}.png`), `caption`, `image` (a path, an
        embedded image or `None`) and `regions`, each `{"description", "detail", "box"}` with a normalized box.

    Raises:
        `ValueError`: a row is malformed; the message names the row index and the field.
    """
    records = []
    for index, row in enumerate(_read_rows(source, None)):
        try:
            if isinstance(row, LayoutError):
                raise row
            if not isinstance(row, dict):
                raise LayoutError(f"a row must be an object, got {type(row).__name__}")
            caption = row.get("global_caption")
            if not isinstance(caption, str) or not caption.strip():
                raise LayoutError(f"field 'global_caption' must be a non-empty string, got {caption!r}")
            for column in ("bbox_list", "region_caption_list"):
                if row.get(column) is None:
                    raise LayoutError(f"missing field '{column}'")
            boxes = _literal_list(row["bbox_list"], "bbox_list")
            short = _literal_list(row["region_caption_list"], "region_caption_list")
            detail_column = next((c for c in REGION_CAPTION_COLUMNS if c.startswith("detail") and row.get(c)), None)
            detail = _literal_list(row[detail_column], detail_column) if detail_column else short
            if not len(boxes) == len(short) == len(detail):
                raise LayoutError(
                    f"{len(boxes)} boxes, {len(short)} region captions and {len(detail)} detailed captions differ"
                )
            ref = _image_ref(row, image_dir)
            size = _declared_size(row, {}) or _image_size(ref, index)
            regions = []
            for i, (box, description, text) in enumerate(zip(boxes, short, detail)):
                if not isinstance(description, str) or not description.strip():
                    raise LayoutError(f"region {i}: region_caption_list holds {description!r}, not a phrase")
                if not isinstance(text, str) or not text.strip():
                    raise LayoutError(f"region {i}: the detailed caption is {text!r}, not a phrase")
                normalized = list(_pixel_box(box, *size, i))
                regions.append(
                    {"description": clean_phrase(description), "detail": clean_phrase(text), "box": normalized}
                )
            file_name = row.get("file_name") or f"{index:05d}.png"
            if not isinstance(file_name, str) or Path(file_name).name != file_name:
                raise LayoutError(f"field 'file_name' must be a plain file name, got {file_name!r}")
        except (LayoutError, _UnreadableImage) as err:
            raise ValueError(f"LayoutSAM-Eval row {index}: {err}") from None
        records.append({"file_name": file_name, "caption": caption.strip(), "image": ref, "regions": regions})
    return records
