"""A benchmark's images, generated batch by batch into `images/` under the protocol's names, with a manifest that
lets a stopped run resume where it stopped.

Batch `k` holds items `[k * batch_size, (k + 1) * batch_size)` and is sampled with seed `seed + k`, so each image
depends only on its batch, never on what ran before: a resumed run, or a longer `--limit` over the same files,
regenerates nothing already written and gives the images an unbroken run gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from echogen_rl.eval.benchmarks.protocols import BenchmarkItem
from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.inference import generate_images
from echogen_rl.eval.visualize import save_image
from echogen_rl.models.image_tokenizers import ImageTokenizer

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGES = "images"


def _batch_record(items: Sequence[BenchmarkItem]) -> dict:
    # The layouts' digest: a batch is reused only for the same prompts, so edited annotation files regenerate.
    digest = hashlib.sha256(json.dumps([i.layout.to_dict() for i in items], sort_keys=True).encode()).hexdigest()
    return {"names": [i.name for i in items], "layouts_sha256": digest[:16]}


def read_manifest(out: Path, settings: dict) -> dict:
    """The manifest of a previous run in `out` with the same settings, or a new one.

    Raises:
        `ValueError`: the folder holds a run with other settings; the message names the first that differs.
    """
    path = out / MANIFEST
    if not path.is_file():
        return {"settings": settings, "batches": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); pass --overwrite to start again") from None
    for key, value in settings.items():
        if manifest.get("settings", {}).get(key) != value:
            raise ValueError(
                f"{out} holds a run with {key}={manifest.get('settings', {}).get(key)!r}, not {value!r}: pass the "
                "same settings to resume it, or --overwrite to start again"
            )
    return manifest


def generate_benchmark_images(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[BenchmarkItem],
    out: str | os.PathLike,
    decoder: ImageTokenizer,
    settings: dict,
    progress: bool = True,
) -> dict:
    """Generates every item's image into `out/images/<item.name>`, resuming a stopped run of the same settings.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer.
        items (`Sequence[BenchmarkItem]`): the benchmark's layouts, in protocol order.
        out (`str` or `os.PathLike`): the run's folder; `manifest.json` and `images/` go there.
        decoder (`ImageTokenizer`): turns codes into pixels (the model's VQ decoder).
        settings (`dict`): what the images depend on: at least `seed`, `batch_size`, `guidance_scale` and
            `temperature`; a previous run in `out` must have recorded the same.
        progress (`bool`, *optional*, defaults to `True`): a progress bar over batches.

    Returns:
        `dict`: the manifest: `settings` and `batches` (`{k: {"names", "layouts_sha256"}}`, the finished ones).
    """
    out = Path(out)
    image_dir = out / IMAGES
    image_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out, settings)
    size = settings["batch_size"]
    starts = range(0, len(items), size)
    reused = 0
    for k, start in enumerate(tqdm(starts, desc="benchmark images", unit="batch", disable=not progress)):
        batch = items[start : start + size]
        record = _batch_record(batch)
        if manifest["batches"].get(str(k)) == record and all((image_dir / i.name).is_file() for i in batch):
            reused += 1
            continue
        codes = generate_images(
            model,
            tokenizer,
            [i.layout for i in batch],
            settings["guidance_scale"],
            settings["temperature"],
            settings["seed"] + k,
            len(batch),
        )
        for item, image in zip(batch, decoder.decode(codes)):
            save_image(image.convert("RGB"), image_dir / item.name)
        manifest["batches"][str(k)] = record
        write_report(manifest, out / MANIFEST)  # after the images: a listed batch is always complete
    if reused:
        logger.info("resumed: %d of %d batches were already generated in %s", reused, len(starts), out)
    return manifest
