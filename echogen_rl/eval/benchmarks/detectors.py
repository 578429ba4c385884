"""Detectors for the COCO benchmark, behind one call: `detect(images, items) -> [(layout, scores), ...]`, boxes
normalized to each image.

- `yolo:PATH`: an `ultralytics` YOLO model from a local weights file (InstanceDiffusion's protocol uses YOLOv8);
  the optional extra `pip install 'echogen-rl[eval]'` brings the package.
- `PATH.json`: an external detector's COCO results file for the generated images, read by image id.
- `grounder`: the model's own grounder asked for each layout's phrases on its re-encoded image. It is not the
  protocol (a model grading itself), but it needs no other weights: an offline check of the path.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from echogen_rl.eval.benchmarks.protocols import BenchmarkItem
from echogen_rl.eval.coco_results import coco_results_layouts, read_coco_results
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.image_tokenizers import ImageTokenizer
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.models.prompts import PromptBuilder

Detections = list[tuple[Layout, list[float]]]


class Detector(Protocol):
    def detect(self, images: Sequence[Image.Image], items: Sequence[BenchmarkItem]) -> Detections:
        """The objects found in each image (normalized xyxy boxes, phrases as the benchmark names its categories),
        with a confidence per object."""
        ...


class GrounderDetector:
    """The in-model grounder, asked for each layout's phrases on the image as the model's tokenizer encodes it."""

    def __init__(self, model: torch.nn.Module, tokenizer, encoder: ImageTokenizer):
        num_codes = unwrap_janus(model).config.vision_config.num_image_tokens
        self.grounder = Grounder(model, PromptBuilder(tokenizer, num_codes))
        self.encoder = encoder

    def detect(self, images: Sequence[Image.Image], items: Sequence[BenchmarkItem]) -> Detections:
        results = self.grounder(self.encoder.encode(list(images)), [item.layout.phrases for item in items])
        return [(r.layout, [1.0] * len(r.layout)) for r in results]


def yolo_layout(result) -> tuple[Layout, list[float]]:
    """An `ultralytics` result (`.boxes.xyxyn`, `.boxes.cls`, `.boxes.conf`, `.names`) as a layout and scores."""
    boxes = result.boxes
    entities, scores = [], []
    for box, cls, conf in zip(boxes.xyxyn.tolist(), boxes.cls.tolist(), boxes.conf.tolist()):
        x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
        entities.append(Entity(" ".join(str(result.names[int(cls)]).split()), (x1, y1, x2, y2)))
        scores.append(float(conf))
    return Layout(entities), scores


class YoloDetector:
    """An `ultralytics` YOLO model from a local weights file (e.g. `yolov8x.pt`); nothing is downloaded.

    Args:
        weights (`str` or `os.PathLike`): the weights file.
        device (`str`, *optional*): the torch device; by default ultralytics' choice.
        conf (`float`, *optional*, defaults to `0.001`): lowest confidence kept; AP ranks by confidence, so a low
            threshold (COCO's usual 0.001) keeps the recall end of the curve.
        iou (`float`, *optional*, defaults to `0.7`): NMS IoU threshold (ultralytics' default).
        max_det (`int`, *optional*, defaults to `100`): detections per image, COCOeval's own cap.
        imgsz (`int`, *optional*, defaults to `640`): the detector's input size.
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        device: str | None = None,
        conf: float = 0.001,
        iou: float = 0.7,
        max_det: int = 100,
        imgsz: int = 640,
    ):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--detector yolo:{path}: no such weights file (e.g. a downloaded yolov8x.pt)")
        try:
            from ultralytics import YOLO
        except ImportError as err:
            raise ImportError(
                f"--detector yolo:{path} needs the ultralytics package: pip install 'echogen-rl[eval]' ({err})"
            ) from err
        self.model = YOLO(str(path))
        self.kwargs = {"conf": conf, "iou": iou, "max_det": max_det, "imgsz": imgsz, "verbose": False}
        if device is not None:
            self.kwargs["device"] = device

    def detect(self, images: Sequence[Image.Image], items: Sequence[BenchmarkItem]) -> Detections:
        return [yolo_layout(r) for r in self.model.predict(list(images), **self.kwargs)]


class ResultsFileDetector:
    """An external detector's COCO results JSON (`[{"image_id", "category_id", "bbox", "score"}, ...]`, pixel
    boxes of the generated images), read and checked once, then looked up by the items' COCO image ids."""

    def __init__(self, path: str | os.PathLike, categories: dict[int, str]):
        if not Path(path).is_file():
            raise FileNotFoundError(f"--detector {path}: no such COCO results file")
        self.path, self.categories = Path(path), categories
        # By image id: each batch converts its own images' entries, not the whole file again.
        self.by_image: dict[int, list[dict]] = defaultdict(list)
        for entry in read_coco_results(path, categories):
            self.by_image[entry["image_id"]].append(entry)

    def detect(self, images: Sequence[Image.Image], items: Sequence[BenchmarkItem]) -> Detections:
        ids = [item.image_id for item in items]
        if None in ids:
            raise ValueError(f"--detector {self.path}: a results file names images by COCO id; these items have none")
        entries = [entry for image_id in ids for entry in self.by_image.get(image_id, [])]
        layouts, scores = coco_results_layouts(entries, ids, self.categories, [im.size for im in images])
        return list(zip(layouts, scores))


def load_detector(
    spec: str | Detector,
    model: torch.nn.Module,
    tokenizer,
    encoder: ImageTokenizer,
    categories: dict[int, str] | None,
    device: str | None = None,
) -> Detector:
    """The detector `spec` names: `"grounder"`, `"yolo:PATH"`, a results `.json` file, or a `Detector` object."""
    if not isinstance(spec, str):
        if not callable(getattr(spec, "detect", None)):
            raise TypeError(f"detector {spec!r} has no detect(images, items) method")
        return spec
    if spec == "grounder":
        return GrounderDetector(model, tokenizer, encoder)
    if spec.startswith("yolo:"):
        return YoloDetector(spec.removeprefix("yolo:"), device=device)
    if spec.endswith(".json"):
        return ResultsFileDetector(spec, categories or {})
    raise ValueError(f"--detector {spec!r}: expected 'grounder', 'yolo:WEIGHTS.pt' or a COCO results .json file")
