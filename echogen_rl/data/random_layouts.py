"""Random layouts: CycleRL's prompts when no dataset is given (phrases from a pool, random boxes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from datasets import Dataset

from echogen_rl.layout import Entity, Layout, pairwise_iou
from echogen_rl.models.prompts import l2i_prompt_text


def add_prompt_column(dataset: Dataset) -> Dataset:
    """Adds CycleRL's `prompt` column to a dataset with `caption` and `layout` (JSON) columns.

    Image columns are dropped: rollouts make the images, and TRL would take an `image` column for a VLM's input.
    """

    def to_prompt(row):
        layout = Layout.from_json(row["layout"])
        layout.caption = row.get("caption") or layout.caption
        return {"prompt": l2i_prompt_text(layout)}

    images = [c for c in ("image", "images", "image_codes", "image_path") if c in dataset.column_names]
    return dataset.remove_columns(images).map(to_prompt, desc="prompts")


def random_layout(
    rng: np.random.Generator,
    phrases: Sequence[str],
    min_entities: int = 1,
    max_entities: int = 3,
    min_box_size: float = 0.2,
    max_box_size: float = 0.5,
    max_overlap: float = 0.0,
    grid_size: int | None = None,
    max_tries: int = 50,
) -> Layout:
    """A layout of distinct phrases with non-degenerate boxes that overlap by at most `max_overlap` IoU.

    Args:
        grid_size (`int`, *optional*): snap boxes to a grid of this many cells per side (as the shapes world
            draws them), so that an exact drawing of the layout exists.
    """
    k = int(rng.integers(min_entities, max_entities + 1))
    chosen = rng.choice(len(phrases), size=min(k, len(phrases)), replace=False)
    entities: list[Entity] = []
    for idx in chosen:
        for _ in range(max_tries):
            w, h = rng.uniform(min_box_size, max_box_size, 2)
            x1, y1 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            box = (x1, y1, x1 + w, y1 + h)
            if grid_size:
                box = tuple(round(v * grid_size) / grid_size for v in box)
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue
            if entities:
                overlap = pairwise_iou(torch.tensor([box]), torch.tensor([e.box for e in entities])).max()
                if overlap > max_overlap:
                    continue
            entities.append(Entity(str(phrases[idx]), box))
            break
    if not entities:  # the first box always fits; this guards a max_tries of 0
        raise ValueError("random_layout: could not place any entity; relax min_box_size or max_overlap")
    return Layout(entities, caption="an image of " + " and ".join(f"a {e.phrase}" for e in entities))


def build_random_layout_dataset(num_prompts: int, seed: int, phrases: Sequence[str], **kwargs) -> Dataset:
    """Columns `prompt` (L2I user text), `caption`, `layout` (JSON); `kwargs` go to `random_layout`."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if not phrases:
        raise ValueError("the phrase pool is empty")
    rng = np.random.default_rng(seed)
    layouts = [random_layout(rng, phrases, **kwargs) for _ in range(num_prompts)]
    return Dataset.from_dict(
        {
            "prompt": [l2i_prompt_text(lay) for lay in layouts],
            "caption": [lay.caption for lay in layouts],
            "layout": [lay.to_json() for lay in layouts],
        }
    )
