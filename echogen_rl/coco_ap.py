"""COCO box AP of layouts against layouts: pycocotools' own (`coco_ap`), and the same AP over any resample of the
images in milliseconds (`ResampledAP`), for bootstrap intervals."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .layout import Layout

# Normalized boxes are scaled to this many pixels per side for pycocotools. Only COCO's small/medium/large area
# ranges depend on it, and AP, AP50 and AP75 are reported over all areas.
COCO_IMAGE_SIZE = 1000


def phrase_key(phrase: str) -> str:
    # Same normalization as `match_layouts`: a detector writing "Red  Circle" still names the red circle.
    return " ".join(phrase.split()).lower()


def check_pairs(detections: Sequence, targets: Sequence, what: str = "detections") -> None:
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} {what} for {len(targets)} target layouts")


def coco_ap(
    detections: Sequence[Layout], targets: Sequence[Layout], scores: Sequence[Sequence[float]] | None = None
) -> dict:
    """COCO box AP of detections against target layouts, computed by pycocotools' `COCOeval`.

    Image `i` is `targets[i]` drawn on a `COCO_IMAGE_SIZE` square; the categories are the distinct target phrases
    (compared case- and whitespace-insensitively). A detection whose phrase is no target phrase is dropped and
    counted: COCO averages only over categories with ground truth, so it could not change AP anyway.

    Args:
        detections (`Sequence[Layout]`): the detected entities of each image.
        targets (`Sequence[Layout]`): the ground truth of each image.
        scores (`Sequence[Sequence[float]]`, *optional*): a confidence per detected entity, used to rank them;
            by default every detection scores 1.0 (then ties keep detection order, as in pycocotools).

    Returns:
        `dict`: `ap` (AP@[.5:.95]), `ap50`, `ap75` as `COCOeval.stats` reports them, except that its `-1` (no
        ground truth at all) becomes `None`; and `dropped_detections`.
    """
    check_pairs(detections, targets)
    if scores is not None:
        check_pairs(scores, detections, "score lists")
        for i, (layout, row) in enumerate(zip(detections, scores)):
            if len(row) != len(layout):
                raise ValueError(f"image {i}: {len(row)} scores for {len(layout)} detected entities")
    names = sorted({phrase_key(e.phrase) for t in targets for e in t.entities})
    category = {name: k for k, name in enumerate(names, start=1)}

    def to_coco(layouts: Sequence[Layout], scores: Sequence[Sequence[float]] | None) -> tuple[COCO, int]:
        annotations, dropped = [], 0
        for i, layout in enumerate(layouts, start=1):
            for k, e in enumerate(layout.entities):
                if phrase_key(e.phrase) not in category:
                    dropped += 1
                    continue
                x1, y1, x2, y2 = (v * COCO_IMAGE_SIZE for v in e.box)
                box, score = [x1, y1, x2 - x1, y2 - y1], 1.0 if scores is None else float(scores[i - 1][k])
                # Ids start at 1: COCOeval stores matched ids in arrays where 0 means "unmatched".
                ann = {"id": len(annotations) + 1, "image_id": i, "category_id": category[phrase_key(e.phrase)]}
                annotations.append(ann | {"bbox": box, "area": box[2] * box[3], "iscrowd": 0, "score": score})
        # Built like `COCO.loadRes` builds detections; loadRes itself rejects an empty list, a valid answer.
        coco = COCO()
        coco.dataset = {
            "images": [
                {"id": i, "width": COCO_IMAGE_SIZE, "height": COCO_IMAGE_SIZE} for i in range(1, len(targets) + 1)
            ],
            "categories": [{"id": k, "name": name} for name, k in category.items()],
            "annotations": annotations,
        }
        coco.createIndex()
        return coco, dropped

    if not category:
        return {"ap": None, "ap50": None, "ap75": None, "dropped_detections": sum(map(len, detections))}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every step
        (gt, _), (dt, dropped) = to_coco(targets, None), to_coco(detections, scores)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap, ap50, ap75 = (None if v == -1 else float(v) for v in evaluator.stats[:3])
    return {"ap": ap, "ap50": ap50, "ap75": ap75, "dropped_detections": dropped}


class ResampledAP:
    """COCO box AP and AP50 of unscored detections (all scores equal, as the oracle's), exactly as [`coco_ap`]
    computes them with pycocotools, over any multiset of the images: a bootstrap resample costs a few
    milliseconds instead of a pycocotools run.

    Each image's matches (per category and IoU threshold, by COCOeval's greedy rule and pycocotools' own IoU) are
    computed once; `ap(images)` then accumulates them as COCOeval does for that list of images (a repeated
    image counts as a new one), its detections ranked in image order (equal scores, stable sort).
    """

    _THRESHOLDS = np.linspace(0.5, 0.95, 10)
    _RECALLS = np.linspace(0.0, 1.0, 101)

    def __init__(self, detections: Sequence[Layout], targets: Sequence[Layout]):
        from pycocotools import mask as mask_utils

        check_pairs(detections, targets)
        self.size = len(targets)
        # Per image: {category: (matched [T, n_dets] bool, n_gts)}; categories are the target phrases.
        self.images: list[dict[str, tuple[np.ndarray, int]]] = []
        for det, target in zip(detections, targets):
            per_category = {}
            gts: dict[str, list] = {}
            for e in target.entities:
                gts.setdefault(phrase_key(e.phrase), []).append(e.box)
            dts: dict[str, list] = {}
            for e in det.entities:
                dts.setdefault(phrase_key(e.phrase), []).append(e.box)
            for name in set(gts) | set(dts):
                g = [[v * COCO_IMAGE_SIZE for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])] for b in gts.get(name, [])]
                d = [[v * COCO_IMAGE_SIZE for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])] for b in dts.get(name, [])]
                d = d[:100]  # COCOeval's maxDets
                matched = np.zeros((len(self._THRESHOLDS), len(d)), dtype=bool)
                if g and d:
                    ious = np.asarray(mask_utils.iou(d, g, [0] * len(g)))
                    for t, threshold in enumerate(self._THRESHOLDS):
                        taken = np.zeros(len(g), dtype=bool)
                        for i in range(len(d)):
                            best, m = min(threshold, 1 - 1e-10), -1
                            for j in range(len(g)):
                                if taken[j] or ious[i, j] < best:
                                    continue
                                best, m = ious[i, j], j
                            if m >= 0:
                                taken[m] = matched[t, i] = True
                per_category[name] = (matched, len(g))
            self.images.append(per_category)
        self.categories = sorted({phrase_key(e.phrase) for t in targets for e in t.entities})

    def ap(self, images: Sequence[int] | None = None) -> dict:
        """`{"ap": AP@[.5:.95], "ap50": AP@.5}` over `images` (indices, repeats allowed; default all, in order);
        `None` values when those images hold no target entity."""
        images = range(self.size) if images is None else images
        per_category: dict[str, list] = {}
        totals: dict[str, int] = {}
        for i in images:
            for name, (matched, n_gt) in self.images[i].items():
                per_category.setdefault(name, []).append(matched)
                totals[name] = totals.get(name, 0) + n_gt
        precisions = []  # [categories with ground truth] of [T, R]
        for name, parts in per_category.items():
            if totals[name] == 0:
                continue  # a category without ground truth in these images is not averaged (COCO's -1)
            tps = np.concatenate(parts, axis=1)
            tp, fp = np.cumsum(tps, axis=1, dtype=np.float64), np.cumsum(~tps, axis=1, dtype=np.float64)
            table = np.zeros((len(self._THRESHOLDS), len(self._RECALLS)))
            for t in range(len(self._THRESHOLDS)):
                if not tps.shape[1]:
                    continue
                recall = tp[t] / totals[name]
                precision = tp[t] / (tp[t] + fp[t] + np.spacing(1))
                precision = np.maximum.accumulate(precision[::-1])[::-1]  # COCOeval's right-to-left envelope
                where = np.searchsorted(recall, self._RECALLS, side="left")
                valid = where < len(precision)
                table[t, valid] = precision[where[valid]]
            precisions.append(table)
        if not precisions:
            return {"ap": None, "ap50": None}
        stacked = np.stack(precisions)
        return {"ap": float(stacked.mean()), "ap50": float(stacked[:, 0].mean())}
