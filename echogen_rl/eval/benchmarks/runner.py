"""`echogen-rl eval --benchmark coco|layoutsam|refexp`: one benchmark of the paper's table for one checkpoint.

Each run writes into its own folder: `images/` (the generated images, under the protocol's names) and
`manifest.json` (which batches are done: a stopped run resumes), then `report.json` (settings, results, the
paper-table row) and `report.md` (the row). COCO also writes `detections.json` (the detector's COCO results, which
`--detector detections.json` scores again without the detector); refexp writes `predictions.json`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from echogen_rl.data.common import open_image
from echogen_rl.eval.benchmarks.detectors import Detector, load_detector
from echogen_rl.eval.benchmarks.fid import compute_fid, inception_extractor
from echogen_rl.eval.benchmarks.generation import IMAGES, MANIFEST, generate_benchmark_images
from echogen_rl.eval.benchmarks.layoutsam_judge import HFJudge, judge_layoutsam
from echogen_rl.eval.benchmarks.protocols import BenchmarkItem, coco_items, layoutsam_items
from echogen_rl.eval.benchmarks.refexp import evaluate_refexp, load_referring_expressions
from echogen_rl.eval.benchmarks.report import paper_table
from echogen_rl.eval.coco_ap import coco_ap, phrase_key
from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.generate import image_tokenizer_for
from echogen_rl.models.image_tokenizers import ImageTokenizer
from echogen_rl.models.loading import load_model
from echogen_rl.models.sampling import resolve_guidance_scale, resolve_temperature

logger = logging.getLogger(__name__)

BENCHMARKS = ("coco", "layoutsam", "refexp")
# The files a run writes; --overwrite removes these and nothing else.
RUN_FILES = (MANIFEST, IMAGES, "report.json", "report.md", "detections.json", "judge.json", "predictions.json")
# The flags each benchmark needs, and what they name.
REQUIRED = {
    "coco": {
        "instances": "--instances",
        "captions": "--captions",
        "image_dir": "--image-dir",
        "detector": "--detector",
    },
    "layoutsam": {"rows": "--rows", "judge": "--judge"},
    "refexp": {"refs": "--refs", "image_dir": "--image-dir"},
}


def _check_args(benchmark: str, given: dict, limit: int | None) -> None:
    """Refuses a run that cannot work before any model is loaded; errors name the flag."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"--benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    for key, flag in REQUIRED[benchmark].items():
        if given.get(key) is None:
            raise ValueError(f"--benchmark {benchmark} needs {flag}")
    for key in ("instances", "captions", "rows", "refs"):
        value = given.get(key)
        if isinstance(value, (str, os.PathLike)) and not Path(value).exists():
            raise FileNotFoundError(f"--{key} {value}: no such file")
    if given.get("image_dir") is not None and not Path(given["image_dir"]).is_dir():
        raise FileNotFoundError(f"--image-dir {given['image_dir']}: no such directory")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")


def prepare_output(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The run folder: empty, a stopped run's to resume (it holds a manifest), or cleared of a run's files with
    `overwrite` (other files are left alone)."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if overwrite:
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        elif not (out / MANIFEST).is_file():
            raise FileExistsError(f"{out} is not empty and holds no run to resume; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def score_coco(
    detector: Detector, items: Sequence[BenchmarkItem], image_dir: Path, categories: dict[int, str], batch_size: int
) -> tuple[dict, list[dict]]:
    """COCO AP/AP50/AP75 of the detections on the generated images against the input layouts (pycocotools), and
    the detections as a COCO results list (pixel `bbox`, categories by id)."""
    detections, scores, results = [], [], []
    ids = {phrase_key(name): cid for cid, name in categories.items()}
    for start in tqdm(range(0, len(items), batch_size), desc="detect", unit="batch"):
        batch = items[start : start + batch_size]
        images = [_open(image_dir / item.name) for item in batch]
        for item, image, (layout, conf) in zip(batch, images, detector.detect(images, batch), strict=True):
            detections.append(layout)
            scores.append(conf)
            w, h = image.size
            for entity, score in zip(layout.entities, conf):
                x1, y1, x2, y2 = entity.box
                if phrase_key(entity.phrase) in ids and item.image_id is not None:
                    bbox = [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h]
                    cid = ids[phrase_key(entity.phrase)]
                    results.append({"image_id": item.image_id, "category_id": cid, "bbox": bbox, "score": score})
    return coco_ap(detections, [item.layout for item in items], scores), results


def score_fid(
    items: Sequence[BenchmarkItem], image_dir: Path, extractor: torch.nn.Module, resolution: int, device: str
) -> dict:
    """FID of the generated images against the real images of the same layouts."""
    missing = [item.name for item in items if item.real_image is None]
    if missing:
        raise ValueError(f"FID needs the real image of every layout; {len(missing)} have none (first: {missing[0]})")
    real = [r if isinstance(r, str) else open_image(r) for r in (item.real_image for item in items)]
    return compute_fid([image_dir / item.name for item in items], real, extractor, resolution, device=device)


def _score_images(
    model,
    tokenizer,
    decoder,
    items: Sequence[BenchmarkItem],
    out: Path,
    report: dict,
    scorer: dict,
    fid_resolution: int,
    batch_size: int,
) -> dict:
    """The generated images' scores: COCO AP by the detector or LayoutSAM-Eval by the judge, and FID if asked."""
    device = str(next(model.parameters()).device)
    results = {}
    if report["benchmark"] == "coco":
        detector = scorer["detector"]
        found = load_detector(detector, model, tokenizer, decoder, scorer["categories"], device)
        results["coco"], detections = score_coco(found, items, out / IMAGES, scorer["categories"], batch_size)
        write_report(detections, out / "detections.json")
        report["detector"] = detector if isinstance(detector, str) else type(detector).__name__
    else:
        judge = scorer["judge"]
        judge = HFJudge.from_pretrained(judge, device=device) if isinstance(judge, (str, os.PathLike)) else judge
        records = [{"file_name": item.name, "regions": item.regions} for item in items]
        scored = judge_layoutsam(judge, records, out / IMAGES)
        write_report(scored.pop("per_image"), out / "judge.json")
        report["judge"] = (
            str(scorer["judge"]) if isinstance(scorer["judge"], (str, os.PathLike)) else type(judge).__name__
        )
        results["layoutsam"] = scored
    if scorer["fid_extractor"] is not None:
        results["fid"] = score_fid(items, out / IMAGES, scorer["fid_extractor"], fid_resolution, device)
    return results


def run_benchmark(
    benchmark: str,
    model_name_or_path: str,
    output_dir: str | os.PathLike,
    *,
    adapter: str | None = None,
    instances: str | None = None,
    captions: str | None = None,
    image_dir: str | None = None,
    rows: str | None = None,
    refs: str | None = None,
    detector: str | Detector | None = None,
    judge=None,
    fid_weights: str | None = None,
    fid_extractor: torch.nn.Module | None = None,
    fid_resolution: int = 299,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    palette: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
) -> dict:
    """Runs one benchmark of the paper's table on a checkpoint; writes `report.json` and `report.md`.

    Args:
        benchmark (`str`): `"coco"`, `"layoutsam"` or `"refexp"`.
        model_name_or_path (`str`): a Janus checkpoint directory or hub id.
        output_dir (`str` or `os.PathLike`): the run's folder; a stopped run there with the same settings resumes.
        adapter (`str`, *optional*): a PEFT adapter merged into the model.
        instances, captions, image_dir (`str`, *optional*): COCO's `instances_val2017.json`,
            `captions_val2017.json` and `val2017/` (for refexp, `image_dir` holds the referred images).
        rows (`str`, *optional*): LayoutSAM-Eval's rows (parquet, JSON lines, JSON or a saved dataset).
        refs (`str`, *optional*): a referring-expression JSON (Ref-L4 or RefCOCO style).
        detector (`str` or `Detector`, *optional*): COCO's detector, see [`load_detector`].
        judge (`str` or `Judge`, *optional*): LayoutSAM-Eval's judge: a local VLM folder, or a [`Judge`].
        fid_weights, fid_extractor, fid_resolution: with the Inception weights file (or another extractor of
            uint8 images), FID of the generated against the real images, both resized to `fid_resolution` (299).
        limit (`int`, *optional*): the first `limit` layouts (or expressions) only.
        seed, batch_size, guidance_scale, temperature: generation settings; the last two default to the
            checkpoint's recorded sampling.
        palette (`bool`, *optional*, defaults to `False`): decode with the shapes palette (the tiny checkpoint).
        device (`str`, *optional*): any torch device; defaults to CUDA when available.
        overwrite (`bool`, *optional*, defaults to `False`): start again in a folder holding a run.
        provenance (`dict`, *optional*): what ran (commit, versions, hardware), recorded in the report.
    """
    given = {"instances": instances, "captions": captions, "image_dir": image_dir, "rows": rows, "refs": refs}
    _check_args(benchmark, given | {"detector": detector, "judge": judge}, limit)
    if fid_weights is not None and not Path(fid_weights).is_file():
        raise FileNotFoundError(f"--fid-weights {fid_weights}: no such file")
    out = prepare_output(output_dir, overwrite)
    model, tokenizer = load_model(model_name_or_path, adapter, device)
    report = {"benchmark": benchmark, "model": str(model_name_or_path), "adapter": adapter, "limit": limit}
    if benchmark == "refexp":
        expressions = load_referring_expressions(refs, image_dir)[:limit]
        scored = evaluate_refexp(model, tokenizer, expressions, batch_size=batch_size)
        write_report(scored.pop("per_item"), out / "predictions.json")
        report["items"], results = len(expressions), {"refexp": scored}
    else:
        if benchmark == "coco":
            items, categories = coco_items(instances, captions, image_dir, limit)
        else:
            items, categories = layoutsam_items(rows, image_dir, limit), None
        sampling = {
            "seed": seed,
            "batch_size": batch_size,
            "guidance_scale": guidance_scale,
            "temperature": temperature,
        }
        decoder = _generate(model, tokenizer, items, out, report, sampling | {"adapter": adapter, "palette": palette})
        if fid_weights is not None and fid_extractor is None:
            fid_extractor = inception_extractor(fid_weights, str(next(model.parameters()).device))
        scorer = {"detector": detector, "categories": categories, "judge": judge, "fid_extractor": fid_extractor}
        results = _score_images(model, tokenizer, decoder, items, out, report, scorer, fid_resolution, batch_size)
    report["results"] = results
    report["table_row"] = paper_table([report])
    return _write(report, out, provenance)


def _generate(model, tokenizer, items, out: Path, report: dict, sampling: dict) -> ImageTokenizer:
    """Generates the items' images (resuming), records the settings in `report`; returns the decoder used.

    The settings a resumed run must share: which model drew the images and how, so that a folder never mixes two
    models' images (`read_manifest` refuses other settings)."""
    settings = {"benchmark": report["benchmark"], "model": report["model"], "adapter": sampling["adapter"]}
    settings |= {"palette": sampling["palette"], "seed": sampling["seed"], "batch_size": sampling["batch_size"]}
    settings["guidance_scale"] = resolve_guidance_scale(model, sampling["guidance_scale"], "eval --guidance-scale")
    settings["temperature"] = resolve_temperature(model, sampling["temperature"])
    decoder = image_tokenizer_for(model, sampling["palette"])
    generate_benchmark_images(model, tokenizer, items, out, decoder, settings)
    report["items"], report["sampling"] = len(items), settings
    return decoder


def _write(report: dict, out: Path, provenance: dict | None) -> dict:
    """Writes `report.json` and `report.md` atomically; returns the report."""
    if provenance is not None:
        report["provenance"] = provenance
    write_report(report, out / "report.json")
    tmp = out / ".report.md.tmp"
    tmp.write_text(report["table_row"] + "\n")
    tmp.replace(out / "report.md")
    logger.info("report: %s", out / "report.json")
    return report
