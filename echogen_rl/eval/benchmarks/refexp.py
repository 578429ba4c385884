"""Referring-expression grounding (I2L) as Ref-L4 reports it: Acc@0.5, Acc@0.75, Acc@0.9 and mAcc.

    refs = load_referring_expressions("ref-l4-val.json", "images/")
    model, tokenizer = load_model("outputs/djo")
    metrics = evaluate_refexp(model, tokenizer, refs)

Protocol, following Ref-L4's evaluator (`ref_l4/evaluation.py`):

- one expression is one item: the model is asked to locate it alone (`Locate: <expression>`), its first box is the
  prediction, and an answer without a box scores IoU 0;
- an item is correct at a threshold `t` when its IoU is *strictly* above `t` (`iou > t`), so an IoU of exactly 0.5
  misses Acc@0.5; mAcc is the mean accuracy over `t` = 0.50, 0.55, ..., 0.95;
- figures are fractions in [0, 1], where Ref-L4 prints percentages.

The VQ tokenizer center-crops, which would cut off the boxes of a non-square image: each image is first padded to
a centered square (gray 127, as Janus' own image processor pads), so the model sees the whole image, and its
boxes, normalized to that square, are mapped back to the original's pixels (`letterbox`, `to_pixels`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from echogen_rl.layout import Box, iou
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.image_tokenizers import JanusVQTokenizer
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.models.prompts import PromptBuilder

logger = logging.getLogger(__name__)

ACC_THRESHOLDS: tuple[float, ...] = tuple(i / 100 for i in range(50, 100, 5))  # Ref-L4's mAcc thresholds
PAD_COLOR = (127, 127, 127)
EXPRESSION_FIELDS = ("caption", "expression", "sentence")
# COCO-derived boxes often overshoot the image by a fraction of a pixel: up to this much is clipped, more is an error.
_EDGE_SLACK = 1.0


@dataclass(frozen=True)
class RefExpression:
    """One referring expression and the box it refers to.

    Args:
        id (`int` or `str`): the record's `id` (or `ref_id`), else its index in the file.
        image_path (`Path`): the image file.
        expression (`str`): the referring expression, whitespace-normalized.
        box (`tuple[float, float, float, float]`): the target box, pixel xyxy inside the image.
        width (`int`): image width in pixels.
        height (`int`): image height in pixels.
    """

    id: int | str
    image_path: Path
    expression: str
    box: Box
    width: int
    height: int


def load_referring_expressions(path: str | os.PathLike, image_dir: str | os.PathLike) -> list[RefExpression]:
    """Reads a referring-expression file: a JSON list of records, or an object holding it under `"annotations"`
    (Ref-L4's `ref-l4-*.json`).

    Per record:

    - image: `file_name`, else `image_id` as COCO's `{image_id:012d}.jpg`, under `image_dir`;
    - expression: the first present of `caption`, `expression`, `sentence`, `sentences[0]["sent"]` (RefCOCO);
    - `bbox`: COCO `[x, y, w, h]` in pixels; a box over the image edge by up to 1 px is clipped to it;
    - `width` and `height`: from the record, else read from the image file's header;
    - id: `id`, else `ref_id`, else the record's index; ids must be unique.

    Args:
        path (`str` or `os.PathLike`): the JSON file.
        image_dir (`str` or `os.PathLike`): the folder the image names are relative to.

    Returns:
        `list[RefExpression]`: one per record, in file order.

    Raises:
        `FileNotFoundError`: the file, or a record's image, does not exist.
        `ValueError`: the file is not JSON of the shape above, or a record has a missing or bad field; the message
            names the file, the record index (and id) and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such referring-expression file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    # Besides JSONDecodeError (a ValueError): RecursionError for absurdly deep nesting.
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not valid JSON ({type(err).__name__}: {err})") from None
    records = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of records, or an object with the list under 'annotations'")
    if not records:
        raise ValueError(f"{path}: holds no records")
    sizes: dict[Path, tuple[int, int]] = {}  # records share images: each header is read once
    refs, seen = [], {}
    for index, record in enumerate(records):
        ref = _read_record(record, index, path, Path(image_dir), sizes)
        if ref.id in seen:
            raise ValueError(f"{path}: record {index}: id {ref.id!r} is also the id of record {seen[ref.id]}")
        seen[ref.id] = index
        refs.append(ref)
    return refs


def _read_record(record: object, index: int, path: Path, image_dir: Path, sizes: dict) -> RefExpression:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    ref_id = record.get("id", record.get("ref_id"))
    if ref_id is not None:
        if isinstance(ref_id, bool) or not isinstance(ref_id, (int, str)):
            raise ValueError(f"{where}: field 'id' must be an integer or a string, got {ref_id!r}")
        where = f"{where} (id {ref_id!r})"
    image_path, image_field = _image_path(record, image_dir, where)
    if not image_path.is_file():
        raise FileNotFoundError(f"{where}: field '{image_field}': no image file {image_path}")
    expression = _expression(record, where)
    if "bbox" not in record:
        raise ValueError(f"{where}: missing field 'bbox'")
    x, y, w, h = _coco_box(record["bbox"], where)
    width, height = _image_size(record, image_path, image_field, where, sizes)
    if x < -_EDGE_SLACK or y < -_EDGE_SLACK or x + w > width + _EDGE_SLACK or y + h > height + _EDGE_SLACK:
        raise ValueError(
            f"{where}: field 'bbox' {[x, y, w, h]} is outside the {width}x{height} image (x2 = {x + w}, y2 = {y + h})"
        )
    box = (max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h))
    return RefExpression(index if ref_id is None else ref_id, image_path, expression, box, width, height)


def _image_path(record: dict, image_dir: Path, where: str) -> tuple[Path, str]:
    if "file_name" in record:
        name = record["file_name"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: field 'file_name' must be a non-empty string, got {name!r}")
        return image_dir / name, "file_name"
    if "image_id" in record:
        image_id = record["image_id"]
        if isinstance(image_id, str) and image_id.isdigit():
            image_id = int(image_id)
        if isinstance(image_id, bool) or not isinstance(image_id, int) or image_id < 0:
            raise ValueError(f"{where}: field 'image_id' must be a non-negative integer, got {image_id!r}")
        return image_dir / f"{image_id:012d}.jpg", "image_id"
    raise ValueError(f"{where}: missing field 'file_name' (or 'image_id')")


def _expression(record: dict, where: str) -> str:
    name = next((k for k in EXPRESSION_FIELDS if k in record), None)
    if name is not None:
        text = record[name]
    elif "sentences" in record:
        name = "sentences"
        sentences = record[name]
        if not isinstance(sentences, list) or not sentences or not isinstance(sentences[0], dict):
            raise ValueError(f"{where}: field 'sentences' must be a non-empty list of {{'sent': ...}} objects")
        if "sent" not in sentences[0]:
            raise ValueError(f"{where}: field 'sentences' item 0 has no 'sent'")
        text = sentences[0]["sent"]
    else:
        raise ValueError(f"{where}: missing field 'caption' (or 'expression', 'sentence', 'sentences')")
    if not isinstance(text, str):
        raise ValueError(f"{where}: field '{name}' must be a string, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise ValueError(f"{where}: field '{name}' is an empty expression")
    return text


def _coco_box(box: object, where: str) -> tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"{where}: field 'bbox' must be 4 numbers [x, y, w, h], got {box!r}")
    for name, v in zip("xywh", box):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: field 'bbox' {name} is not a number: {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"{where}: field 'bbox' {name} is not finite: {v!r}")
    x, y, w, h = (float(v) for v in box)
    # A zero-area box can never be hit (its IoU with anything is 0): as much an error as a negative size.
    if w <= 0 or h <= 0:
        raise ValueError(f"{where}: field 'bbox' has a negative or zero size (w = {w}, h = {h})")
    return x, y, w, h


def _image_size(record: dict, image_path: Path, image_field: str, where: str, sizes: dict) -> tuple[int, int]:
    if "width" in record and "height" in record:
        out = []
        for name in ("width", "height"):
            v = record[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 or v % 1:
                raise ValueError(f"{where}: field '{name}' must be a positive integer, got {v!r}")
            out.append(int(v))
        return out[0], out[1]
    if image_path not in sizes:
        try:
            with Image.open(image_path) as image:  # reads the header only
                sizes[image_path] = image.size
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{where}: field '{image_field}': {image_path} is not a readable image ({err})") from None
    return sizes[image_path]


def letterbox(image: Image.Image) -> tuple[Image.Image, tuple[int, int, int]]:
    """Pads an image to a square, centered on gray (127, 127, 127), as Janus' image processor does.

    Args:
        image (`PIL.Image.Image`): the image, any size.

    Returns:
        `tuple[PIL.Image.Image, tuple[int, int, int]]`: the RGB square, and `(left, top, side)`: where the image's
        top-left corner sits in it and its side (the image's longer side).
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    square = Image.new("RGB", (side, side), PAD_COLOR)
    square.paste(image, (left, top))
    return square, (left, top, side)


def to_pixels(box: Box, left: int, top: int, side: int, width: int, height: int) -> Box:
    """A box normalized to a `letterbox` square, as pixel xyxy on the original image, clipped to it.

    Args:
        box (`tuple[float, float, float, float]`): `(x1, y1, x2, y2)` normalized to the square, in [0, 1].
        left (`int`): where the image's left edge sits on the square, as `letterbox` returns it.
        top (`int`): where the image's top edge sits on the square.
        side (`int`): the square's side in pixels.
        width (`int`): the original image's width. The frame alone cannot give it (an odd padding puts the extra
            pixel on one side), and the clip needs it: a box reaching into the padding ends at the image's edge.
        height (`int`): the original image's height.
    """
    x1, y1, x2, y2 = box
    xs = (min(width, max(0.0, x1 * side - left)), min(width, max(0.0, x2 * side - left)))
    ys = (min(height, max(0.0, y1 * side - top)), min(height, max(0.0, y2 * side - top)))
    return float(xs[0]), float(ys[0]), float(xs[1]), float(ys[1])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two pixel xyxy boxes, by [`echogen_rl.layout.iou`] in float64; an inverted box has area 0."""
    return float(iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))


def refexp_accuracy(predicted: Sequence[Sequence[float] | None], targets: Sequence[Sequence[float]]) -> dict:
    """Ref-L4's annotation-level accuracies of predicted boxes against target boxes, one pair per expression.

    Args:
        predicted (`Sequence[tuple[float, float, float, float] | None]`): pixel xyxy boxes; `None` where the model
            gave no box (IoU 0).
        targets (`Sequence[tuple[float, float, float, float]]`): the target pixel xyxy boxes.

    Returns:
        `dict`: `acc50`, `acc75`, `acc90` (the fraction of items with IoU strictly above 0.5, 0.75, 0.9), `macc`
        (their mean over `ACC_THRESHOLDS`), `miou` (mean IoU), all in [0, 1]; and `count`.
    """
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predicted boxes for {len(targets)} targets")
    if not targets:
        raise ValueError("no predicted and target boxes to score")
    ious = [0.0 if p is None else box_iou(p, t) for p, t in zip(predicted, targets)]
    n = len(ious)

    def acc(t: float) -> float:
        return sum(v > t for v in ious) / n

    return {
        "acc50": acc(0.5),
        "acc75": acc(0.75),
        "acc90": acc(0.9),
        "macc": sum(acc(t) for t in ACC_THRESHOLDS) / len(ACC_THRESHOLDS),
        "miou": sum(ious) / n,
        "count": n,
    }


def _read_image(ref: RefExpression) -> Image.Image:
    try:
        with Image.open(ref.image_path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"expression {ref.id!r}: {ref.image_path} is not a readable image ({err})") from None
    # The box is in the record's pixels: an image stored at another size would shift every box silently.
    if image.size != (ref.width, ref.height):
        raise ValueError(
            f"expression {ref.id!r}: {ref.image_path} is {image.width}x{image.height}, the record says "
            f"{ref.width}x{ref.height}"
        )
    return image


def _query_phrase(expression: str) -> str:
    # The grounding query separates phrases with ";": one inside an expression would ask for two objects.
    return expression.replace(";", ",")


@torch.no_grad()
def evaluate_refexp(
    model: torch.nn.Module, tokenizer, refs: Sequence[RefExpression], batch_size: int = 16, progress: bool = True
) -> dict:
    """Grounds each referring expression with the model (greedy) and scores the boxes with `refexp_accuracy`.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP), on its device.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer, with the layout tags.
        refs (`Sequence[RefExpression]`): the expressions, e.g. from `load_referring_expressions`.
        batch_size (`int`, *optional*, defaults to `16`): expressions encoded and grounded together; greedy
            decoding makes the result independent of it.
        progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `dict`: the metrics of `refexp_accuracy`, `not_found` (expressions the answer gave no box for) and
        `per_item`: one `{"id", "expression", "box", "iou", "answer"}` per expression, in order, `box` the predicted
        pixel xyxy box (or `None`) and `answer` the model's text.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not refs:
        raise ValueError("no referring expressions to evaluate")
    vq = JanusVQTokenizer.from_model(model, show_progress=False)
    prompts = PromptBuilder(tokenizer, unwrap_janus(model).config.vision_config.num_image_tokens)
    grounder = Grounder(model, prompts, batch_size=batch_size)
    predicted, per_item = [], []
    starts = range(0, len(refs), batch_size)
    for start in tqdm(starts, desc="Ref-exp grounding", unit="batch", disable=not progress):
        chunk = refs[start : start + batch_size]
        squares, frames = zip(*(letterbox(_read_image(ref)) for ref in chunk))
        results = grounder(vq.encode(list(squares)), [[_query_phrase(ref.expression)] for ref in chunk])
        for ref, frame, result in zip(chunk, frames, results):
            entities = result.layout.entities
            box = to_pixels(entities[0].box, *frame, ref.width, ref.height) if entities else None
            overlap = 0.0 if box is None else box_iou(box, ref.box)
            predicted.append(box)
            per_item.append(
                {
                    "id": ref.id,
                    "expression": ref.expression,
                    "box": None if box is None else list(box),
                    "iou": overlap,
                    "answer": result.text,
                }
            )
    metrics = refexp_accuracy(predicted, [ref.box for ref in refs])
    not_found = sum(box is None for box in predicted)
    logger.info(
        "referring expressions: %d, Acc@0.5 %.4f, mAcc %.4f, %d without a box",
        metrics["count"],
        metrics["acc50"],
        metrics["macc"],
        not_found,
    )
    return {**metrics, "not_found": not_found, "per_item": per_item}
