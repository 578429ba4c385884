"""COCO box AP of layouts against layouts: pycocotools' own (`coco_ap`), and the same AP over any resample of the
images in milliseconds (`ResampledAP`), for bootstrap intervals."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from echogen_rl.layout import Layout

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
        # The same as arrays `[categories, images]`: where each image's match columns begin in `_columns`
        # (category-major, then image), how many there are, and its ground-truth count. `ap` then gathers a
        # resample's columns in one indexing and scores every category at once.
        names = sorted({name for image in self.images for name in image})
        empty = (np.zeros((len(self._THRESHOLDS), 0), dtype=bool), 0)
        parts = [image.get(name, empty) for name in names for image in self.images]
        shape = (len(names), self.size)
        self._lengths = np.array([m.shape[1] for m, _ in parts], dtype=np.int64).reshape(shape)
        self._starts = (np.cumsum(self._lengths) - self._lengths.ravel()).reshape(shape)
        self._gts = np.array([n for _, n in parts], dtype=np.int64).reshape(shape)
        self._columns = np.concatenate([empty[0]] + [m for m, _ in parts], axis=1)

    def ap(self, images: Sequence[int] | None = None) -> dict:
        """`{"ap": AP@[.5:.95], "ap50": AP@.5}` over `images` (indices, repeats allowed; default all, in order);
        `None` values when those images hold no target entity."""
        images = np.arange(self.size) if images is None else np.asarray(images, dtype=np.int64)
        totals = self._gts[:, images].sum(axis=1)
        kept = np.flatnonzero(totals > 0)  # a category without ground truth in these images is not averaged
        if not kept.size:
            return {"ap": None, "ap50": None}
        n_thresholds, n_kept = len(self._THRESHOLDS), len(kept)
        counts = self._lengths[kept][:, images]
        segment_lengths = counts.sum(axis=1)  # detections per category: a segment of the columns each
        n = int(segment_lengths.sum())
        if not n:
            return {"ap": 0.0, "ap50": 0.0}
        # The chosen images' columns, category by category, each in image order (equal scores, stable sort).
        flat = counts.ravel()
        before = np.cumsum(flat) - flat
        tps = self._columns[:, np.repeat(self._starts[kept][:, images].ravel() - before, flat) + np.arange(n)]
        segment = np.repeat(np.arange(n_kept), segment_lengths)
        segment_start = np.cumsum(segment_lengths) - segment_lengths
        ranked = np.arange(n) - segment_start[segment] + 1.0  # tp + fp at each column, within its category
        cumulative = np.cumsum(tps, axis=1)
        offset = np.where(segment_start > 0, cumulative[:, np.maximum(segment_start - 1, 0)], 0)
        tp = (cumulative - offset[:, segment]).astype(np.float64)
        recall = tp / totals[kept][segment]
        precision = tp / (tp + (ranked - tp) + np.spacing(1))
        # Per category, COCOeval's right-to-left envelope and its recall lookup, all categories in one call each:
        # complex numbers compare (real, imaginary) in order, so a real part naming the category (and threshold)
        # keeps each running maximum and each search inside its own category.
        backwards = (n_kept - 1 - segment)[::-1] + 1j * precision[:, ::-1]
        precision = np.maximum.accumulate(backwards, axis=1).imag[:, ::-1]
        rows = np.arange(n_thresholds)[:, None] * n_kept
        keys = (rows + segment + 1j * recall).ravel()
        queries = rows[:, :, None] + np.arange(n_kept)[None, :, None] + 1j * self._RECALLS  # [T, K, R]
        where = np.searchsorted(keys, queries.ravel(), side="left").reshape(queries.shape)
        within = where - (np.arange(n_thresholds)[:, None, None] * n + segment_start[None, :, None])
        picked = precision.ravel()[np.minimum(where, precision.size - 1)]
        stacked = np.where(within < segment_lengths[None, :, None], picked, 0.0).transpose(1, 0, 2)  # [K, T, R]
        return {"ap": float(stacked.mean()), "ap50": float(stacked[:, 0].mean())}
