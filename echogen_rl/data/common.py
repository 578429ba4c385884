"""Helpers shared by the data sources: filter counting, bad-sample reporting, layout filtering and row storage.

[`FilterStats`] counts what each step reads, keeps and drops; [`report_bad`] skips an unusable sample with a
[`BadSampleWarning`] or raises, as `on_bad_sample` asks. [`finish_layout`] applies `min_box_area` and
`max_entities` to a loaded layout, [`file_backed`] stores loaded rows under the cache directory so that `datasets`
caches what is computed from them, and [`open_image`] / [`describe_image`] open and name a row's image, whether a
path or embedded bytes. The loaders live in `coco.py` and `layoutsam.py`, the VQ encoding in `codes.py`.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from echogen_rl.layout import Entity, Layout, LayoutError, validate_layout

BAD_SAMPLE_ACTIONS = ("skip", "raise")
# The columns a loader may store, see `file_backed`.
_FEATURES = {
    "caption": datasets.Value("string"),
    "layout": datasets.Value("string"),
    "image_path": datasets.Value("string"),
    "image": datasets.Image(),
}


class BadSampleWarning(UserWarning):
    """A sample skipped because its layout or image is unusable (`on_bad_sample="skip"`)."""


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raises a `ValueError` naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    """Raises a `ValueError` naming `name` unless `value` is an int >= `minimum` (or `None` when `optional`)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


@dataclass
class FilterStats:
    """What the data steps read, kept and dropped; `rows_in` is `rows_kept` plus the four row counters.

    Args:
        rows_in, rows_kept (`int`): rows read (COCO: captioned images) and rows left.
        tiny_boxes_dropped, entities_capped (`int`): entities dropped under `min_box_area` and over `max_entities`.
        empty_layouts_dropped, bad_layouts, bad_images (`int`): rows dropped for having no entity left, for an
            invalid or unparseable layout (a missing, mistyped, non-finite or negative field of the row, its image
            record or one of its boxes), and for an unreadable image.
        rows_beyond_limit (`int`): rows left out by `num_train_samples` / `num_eval_samples`.
        bad_records (`int`): records that belong to no row and were skipped for a missing or mistyped field (COCO:
            a category, a caption, an annotation or image without a usable id).
    """

    rows_in: int = 0
    rows_kept: int = 0
    tiny_boxes_dropped: int = 0
    entities_capped: int = 0
    empty_layouts_dropped: int = 0
    bad_layouts: int = 0
    bad_images: int = 0
    rows_beyond_limit: int = 0
    bad_records: int = 0

    def __add__(self, other: FilterStats) -> FilterStats:
        """The stats of two disjoint sets of rows, e.g. a train and an eval file."""
        return FilterStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def summary(self) -> str:
        return (
            f"kept {self.rows_kept} of {self.rows_in} rows; rows dropped: {self.empty_layouts_dropped} empty layouts, "
            f"{self.bad_layouts} bad layouts, {self.bad_images} bad images, {self.rows_beyond_limit} beyond the "
            f"sample limit; entities dropped: {self.tiny_boxes_dropped} tiny boxes, {self.entities_capped} over "
            f"max_entities; {self.bad_records} bad records skipped"
        )


def report_bad(message: str, on_bad_sample: str) -> None:
    """Raises `message` as a `ValueError` (`"raise"`), or warns it as a `BadSampleWarning` at the loader's caller."""
    if on_bad_sample == "raise":
        raise ValueError(message)
    warnings.warn(f"skipped: {message}", BadSampleWarning, stacklevel=3)


def require_field(record: object, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """`record[key]`, checked to be of `kind` (a bool is never a number); a `LayoutError` naming `what` and the
    field when the record is not an object, or the field is missing or of another type."""
    if not isinstance(record, dict):
        raise LayoutError(f"{what} must be an object, got {type(record).__name__}")
    if key not in record:
        raise LayoutError(f"{what}: field '{key}' is missing")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "a number" if float in kinds else " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
        raise LayoutError(f"{what}: field '{key}' must be {names}, got {value!r}")
    return value


_KIND_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def finite_numbers(values: object, count: int, what: str) -> list[float]:
    """`values` as `count` finite floats; a `LayoutError` naming `what` for another length, a non-number (a bool or
    a string too) or a NaN or infinity."""
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise LayoutError(f"{what} must be a list of {count} numbers, got {values!r}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LayoutError(f"{what}: item {i} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise LayoutError(f"{what}: item {i} is {v}, not a finite number")
        out.append(float(v))
    return out


def _area(box: tuple[float, float, float, float]) -> float:
    # Inverted and NaN boxes count as empty (max(0.0, nan) is 0.0), so they fall under any positive min_box_area.
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def clean_phrase(value: object) -> object:
    # Layout text is parsed back whitespace-normalized, so phrases are stored that way to round-trip exactly.
    return " ".join(value.split()) if isinstance(value, str) else value


def finish_layout(
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


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    """`cache_dir`, or `echogen_rl` under the `datasets` cache."""
    return Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "echogen_rl"


def file_backed(columns: dict[str, list], name: str, cache_dir: str | os.PathLike | None) -> datasets.Dataset:
    """The rows as a dataset stored under `cache_dir`, so that `Dataset.map` caches what is computed from it.

    `datasets` only writes map caches next to a dataset's files, and an in-memory dataset has none. The directory is
    named by the content fingerprint of the rows: the same rows always load the same files, hence the same
    fingerprint, which is what makes later map caches hit.
    """
    in_memory = datasets.Dataset.from_dict(columns, features=datasets.Features({k: _FEATURES[k] for k in columns}))
    if len(in_memory) == 0:  # nothing to cache, and `datasets` cannot load an empty saved dataset back
        return in_memory
    root = cache_root(cache_dir)
    path = root / f"{name}-{in_memory._fingerprint}"
    if not (path / "state.json").exists():
        tmp = root / f"{path.name}.tmp-{os.getpid()}"
        in_memory.save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another process (e.g. another rank) saved the same rows first
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path))


def open_image(ref: object) -> Image.Image:
    """Opens a path or an embedded image lazily: only the header is read until the pixels are used."""
    if isinstance(ref, dict) and ref.get("bytes"):
        return Image.open(io.BytesIO(ref["bytes"]))
    if isinstance(ref, str):
        return Image.open(ref)
    raise ValueError(f"no image (got {type(ref).__name__})")


def describe_image(ref: object, index: int) -> str:
    """Names a row for messages: its index, and its image path when it has one."""
    path = ref if isinstance(ref, str) else ref.get("path") if isinstance(ref, dict) else None
    return f"row {index} ({path})" if path else f"row {index}"
