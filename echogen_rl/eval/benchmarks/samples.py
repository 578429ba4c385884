"""Small benchmark files in the official formats, drawn from the shapes world: COCO's instances and captions JSON
with a `val2017/` folder, LayoutSAM-Eval rows (JSON lines), a Ref-L4 style referring-expression file, and a tiny
random judge. They let every `echogen-rl eval --benchmark ...` path run offline on the tiny checkpoint
(`echogen-rl eval-samples DIR` writes them), and show the formats each reads. Scores on them measure nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from echogen_rl.data.shapes import ShapesConfig, phrase_pool, sample_shapes
from echogen_rl.data.splits import BENCHMARK_SAMPLES_SEED
from echogen_rl.models.tiny import TinyJanusConfig, build_tiny_checkpoint

# The real images are the shapes renderings scaled up (nearest neighbour keeps the cells sharp).
SCALE = 8


# A one-turn chat in Janus' own turn format, for the tiny judge's processor.
JUDGE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<image_placeholder>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def write_sample_judge(output_dir: str | os.PathLike, config: TinyJanusConfig | None = None) -> Path:
    """A tiny random vision-language judge: the tiny Janus checkpoint with a `JanusProcessor` and a chat template,
    which `AutoModelForImageTextToText` loads like any image-text-to-text model. Its answers are noise."""
    from transformers import AutoTokenizer, JanusImageProcessorPil, JanusProcessor

    config = config or TinyJanusConfig()
    path = build_tiny_checkpoint(output_dir, config)
    side = config.grid_size * config.patch_size
    processor = JanusProcessor(
        JanusImageProcessorPil(size={"height": side, "width": side}),
        AutoTokenizer.from_pretrained(path),
        chat_template=JUDGE_CHAT_TEMPLATE,
        num_image_tokens=config.grid_size**2,
    )
    processor.save_pretrained(path)
    return path


def _write_json(data: object, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def write_sample_benchmarks(
    output_dir: str | os.PathLike, num_layouts: int = 16, config: ShapesConfig | None = None
) -> dict[str, Path]:
    """Writes `num_layouts` shapes layouts as each benchmark's files under `output_dir`.

    Returns:
        `dict[str, Path]`: `instances`, `captions`, `image_dir` (COCO), `rows` (LayoutSAM-Eval, images beside it
        by relative path), `refs` (one expression per shape; its images are `image_dir`'s) and `judge` (see
        [`write_sample_judge`]).
    """
    if num_layouts < 1:
        raise ValueError(f"num_layouts must be >= 1, got {num_layouts}")
    config = config or ShapesConfig()
    out = Path(output_dir)
    image_dir = out / "val2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    categories = {name: k for k, name in enumerate(phrase_pool(config), start=1)}
    images, annotations, captions, rows, refs = [], [], [], [], []
    for i in range(num_layouts):
        sample = sample_shapes(np.random.SeedSequence([BENCHMARK_SAMPLES_SEED, i]), config)
        image_id, file_name = 1000 + 7 * i, f"{1000 + 7 * i:012d}.jpg"
        picture = sample.image.resize((sample.image.width * SCALE, sample.image.height * SCALE), Image.NEAREST)
        picture.save(image_dir / file_name, quality=95)
        w, h = picture.size
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        captions.append({"id": 5000 + i, "image_id": image_id, "caption": sample.caption})
        pixel_boxes = [[round(v * s, 2) for v, s in zip(e.box, (w, h, w, h))] for e in sample.layout.entities]
        for e, (x1, y1, x2, y2) in zip(sample.layout.entities, pixel_boxes):
            xywh = [x1, y1, x2 - x1, y2 - y1]
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": categories[e.phrase]}
            annotations.append(ann | {"bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": 0})
            refs.append({"id": len(refs) + 1, "file_name": file_name, "caption": f"the {e.phrase}", "bbox": xywh})
            refs[-1] |= {"width": w, "height": h}
        rows.append(
            {
                "file_name": f"{i:05d}.jpg",
                "global_caption": sample.caption,
                "bbox_list": str(pixel_boxes),  # LayoutSAM-Eval stores its lists as strings
                "region_caption_list": str(sample.layout.phrases),
                "detail_region_caption_list": str([f"a {p} shape" for p in sample.layout.phrases]),
                "width": w,
                "height": h,
                "image_path": f"val2017/{file_name}",
            }
        )
    cats = [{"id": k, "name": name, "supercategory": "shape"} for name, k in categories.items()]
    paths = {
        "instances": _write_json(
            {"images": images, "annotations": annotations, "categories": cats}, out / "instances_val2017.json"
        ),
        "captions": _write_json({"images": images, "annotations": captions}, out / "captions_val2017.json"),
        "image_dir": image_dir,
        "refs": _write_json({"annotations": refs}, out / "refs.json"),
    }
    (out / "layoutsam_eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    paths["rows"] = out / "layoutsam_eval.jsonl"
    paths["judge"] = write_sample_judge(out / "judge")
    return paths
