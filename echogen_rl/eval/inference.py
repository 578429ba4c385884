"""The L2I and I2L runs of an evaluation: generate an image per layout, detect or ground its objects, score them.

- **L2I**: generate an image per layout, detect its objects (shapes oracle, in-model grounder, or an external
  detector's COCO results JSON) and score them against the layouts: COCO AP/AP50/AP75 (pycocotools), pairwise
  spatial agreement, color (shapes), and the cycle mIoU (the grounder's boxes for the input phrases).
- **I2L**: ground each target layout's phrases on its image: Acc@0.5, Acc@0.75, mean IoU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from echogen_rl.data.shapes import ShapesConfig, detect_from_codes, phrase_pool
from echogen_rl.eval.coco_ap import check_pairs as _check_pairs
from echogen_rl.eval.coco_ap import coco_ap
from echogen_rl.eval.coco_results import load_coco_results
from echogen_rl.eval.metrics import color_accuracy, cycle_miou, grounding_accuracy, spatial_accuracy
from echogen_rl.layout import Layout
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.image_tokenizers import JanusVQTokenizer
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.rollout.torch_engine import TorchRolloutEngine

DETECTORS = ("oracle", "grounder")


def _prompts(model: torch.nn.Module, tokenizer) -> PromptBuilder:
    return PromptBuilder(tokenizer, unwrap_janus(model).config.vision_config.num_image_tokens)


@torch.no_grad()
def generate_images(
    model: torch.nn.Module,
    tokenizer,
    layouts: Sequence[Layout],
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> torch.LongTensor:
    """Generates one image per layout with the torch rollout engine.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP).
        tokenizer (`PreTrainedTokenizerBase`): its text tokenizer, with the layout tags.
        layouts (`Sequence[Layout]`): the prompts (caption and entities).
        guidance_scale (`float`, *optional*, defaults to `5.0`): classifier-free guidance scale.
        temperature (`float`, *optional*, defaults to `1.0`): `0` decodes greedily.
        seed (`int`, *optional*, defaults to `0`): seeds one generator drawn from batch after batch, so the images
            depend on the seed and the batch size, never on the global RNG.
        batch_size (`int`, *optional*, defaults to `16`): layouts per rollout.

    Returns:
        `torch.LongTensor` of shape `[len(layouts), num_image_tokens]`: the codes, on the CPU.
    """
    prompts = _prompts(model, tokenizer)
    device = unwrap_janus(model).lm_head.weight.device
    engine = TorchRolloutEngine(model, prompts.num_image_tokens, prompts.bos_id, prompts.boi_id, prompts.pad_id)
    generator = torch.Generator(device=device).manual_seed(seed)
    codes = []
    for start in tqdm(range(0, len(layouts), batch_size), desc="L2I generate", unit="batch"):
        segments = [prompts.l2i_prompt(layout) for layout in layouts[start : start + batch_size]]
        batch = pad_segments(segments, prompts.pad_id, "left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        codes.append(engine.generate(ids, mask, guidance_scale, temperature, None, generator).codes.cpu())
    return torch.cat(codes) if codes else torch.zeros(0, prompts.num_image_tokens, dtype=torch.long)


def evaluate_l2i(
    model: torch.nn.Module,
    tokenizer,
    layouts: Sequence[Layout],
    detector: str = "oracle",
    shapes_config: ShapesConfig | None = None,
    categories: dict[int, str] | None = None,
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    spatial_margin: float = 0.05,
) -> dict:
    """Generates an image per layout, detects its objects and scores the detections against the layouts.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP).
        tokenizer (`PreTrainedTokenizerBase`): its text tokenizer.
        layouts (`Sequence[Layout]`): the evaluation layouts; image `i` has COCO image id `i + 1`.
        detector (`str`, *optional*, defaults to `"oracle"`): `"oracle"` (the shapes detector, exact on the code
            grid), `"grounder"` (the model grounds the layout's phrases on its own image) or the path of a COCO
            results JSON of an external detector run on the generated images (see [`load_coco_results`]).
        shapes_config (`ShapesConfig`, *optional*): the shapes grid; required by the oracle, enables the color
            metric and, for a results JSON, sets the image size and the default categories.
        categories (`dict[int, str]`, *optional*): category id -> phrase of a results JSON; defaults to the shapes
            phrase pool numbered from 1 (`phrase_pool(shapes_config)`).
        guidance_scale, temperature, seed, batch_size: passed to [`generate_images`].
        spatial_margin (`float`, *optional*, defaults to `0.05`): see [`spatial_accuracy`].

    Returns:
        `dict`: `metrics` (`ap`, `ap50`, `ap75`, `dropped_detections`, `spatial`, `color` (shapes only),
        `cycle_miou`), and for pictures `codes` (`[N, num_image_tokens]`), `detections` and `recovered` (the
        grounder's layouts, used for the cycle mIoU).
    """
    if detector == "oracle" and shapes_config is None:
        raise ValueError("the oracle detector reads shapes code grids: pass shapes_config")
    if detector not in DETECTORS and not Path(detector).is_file():
        raise FileNotFoundError(f"detector {detector!r} is neither one of {DETECTORS} nor a COCO results file")
    if detector not in DETECTORS and categories is None and shapes_config is None:
        raise ValueError("a COCO results file needs categories (category id -> phrase)")
    codes = generate_images(model, tokenizer, layouts, guidance_scale, temperature, seed, batch_size)
    grounded = Grounder(model, _prompts(model, tokenizer))(codes, [layout.phrases for layout in layouts])
    recovered = [g.layout for g in grounded]
    scores = None
    if detector == "oracle":
        detections = [detect_from_codes(row, shapes_config) for row in codes.tolist()]
    elif detector == "grounder":
        detections = recovered
    else:
        categories = categories or dict(enumerate(phrase_pool(shapes_config), start=1))
        size = shapes_config.image_size if shapes_config else JanusVQTokenizer.from_model(model).image_size
        ids = list(range(1, len(layouts) + 1))
        detections, scores = load_coco_results(detector, ids, categories, [(size, size)] * len(ids))
    metrics = coco_ap(detections, layouts, scores)
    metrics["spatial"] = spatial_accuracy(detections, layouts, spatial_margin)
    if shapes_config is not None:
        metrics["color"] = color_accuracy(codes, layouts, shapes_config)
    metrics["cycle_miou"] = cycle_miou(recovered, layouts)
    return {"metrics": metrics, "codes": codes, "detections": detections, "recovered": recovered}


def evaluate_i2l(
    model: torch.nn.Module, tokenizer, codes: torch.Tensor | Sequence[Sequence[int]], targets: Sequence[Layout]
) -> dict:
    """Grounds each target's phrases on its image with the in-model grounder.

    Returns:
        `dict`: `acc50`, `acc75`, `miou` (see [`grounding_accuracy`]), `parse_failure_rate` (the fraction of
        images whose answer text did not parse or did not end) and `problem_rate` (the fraction whose answer had
        any problem: also a well-formed answer that misnamed an entity or left one out).
    """
    _check_pairs(codes, targets, "images")
    results = Grounder(model, _prompts(model, tokenizer))(codes, [t.phrases for t in targets])
    metrics = grounding_accuracy([r.layout for r in results], targets)
    metrics["parse_failure_rate"] = sum(r.malformed for r in results) / len(results) if results else None
    metrics["problem_rate"] = sum(bool(r.problems) for r in results) / len(results) if results else None
    return metrics
