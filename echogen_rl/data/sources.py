"""Data sources of the training stages: procedural shapes, COCO and LayoutSAM, as script arguments.

Every source ends as a `datasets.Dataset` with the columns `caption`, `layout` (JSON of a `Layout`, normalized xyxy
boxes) and `image_codes` (the image as a flat list of VQ codes); training code reads only those three. COCO and
LayoutSAM take two steps: a loader ([`load_coco`] in `coco.py`, [`load_layoutsam`] in `layoutsam.py`) turns
annotations into filtered layouts with an image reference, then [`encode_image_codes`] (`codes.py`) turns the images
into codes. This module holds [`LayoutDataArguments`] and [`build_layout_datasets`], which runs both steps for them,
and re-exports the names above. Each step counts what it dropped in a [`FilterStats`] (`common.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets

from echogen_rl.data.coco import load_coco
from echogen_rl.data.codes import encode_image_codes
from echogen_rl.data.common import BAD_SAMPLE_ACTIONS, BadSampleWarning, FilterStats, check_choice, check_int
from echogen_rl.data.layoutsam import REGION_CAPTION_COLUMNS, load_layoutsam
from echogen_rl.data.shapes import ShapesConfig, build_shapes_dataset
from echogen_rl.data.splits import EVAL_SEED_OFFSET
from echogen_rl.models.image_tokenizers import ImageTokenizer, JanusVQTokenizer

__all__ = [
    "BAD_SAMPLE_ACTIONS",
    "DATASETS",
    "EVAL_SEED_OFFSET",
    "PROMPT_SOURCES",
    "REGION_CAPTION_COLUMNS",
    "BadSampleWarning",
    "CycleRLDataArguments",
    "FilterStats",
    "LayoutDataArguments",
    "build_layout_datasets",
    "encode_image_codes",
    "load_coco",
    "load_layoutsam",
]

logger = logging.getLogger(__name__)

DATASETS = ("shapes", "coco", "layoutsam")


@dataclass
class LayoutDataArguments:
    """Which data the layout tasks train and evaluate on, as script arguments (`transformers.HfArgumentParser`).

    Args:
        dataset (`str`, *optional*, defaults to `"shapes"`): `"shapes"`, `"coco"` or `"layoutsam"`.
        num_train_samples (`int` or `None`, *optional*, defaults to `2048`): shapes: the number generated;
            COCO and LayoutSAM: a cap on the train rows (`None`: all).
        num_eval_samples (`int`, *optional*, defaults to `64`): eval rows: generated (shapes), split off the end of
            train (no eval files), or a cap on the eval files; `0` disables evaluation.
        dataset_seed (`int`, *optional*, defaults to `0`): shapes seed; eval uses `dataset_seed + EVAL_SEED_OFFSET`.
        shapes_grid_size (`int`, *optional*, defaults to `8`): shapes cells per image side.
        shapes_max_shapes (`int`, *optional*, defaults to `3`): most shapes per shapes image.
        coco_instances_file, coco_captions_file, coco_image_dir (`str`, *optional*): COCO instances JSON, captions
            JSON and image directory, required for `"coco"`.
        coco_eval_instances_file, coco_eval_captions_file, coco_eval_image_dir (`str`, *optional*): the same for
            eval, all or none; without them eval rows are split off the end of train.
        layoutsam_file (`str`, *optional*): LayoutSAM rows (`.jsonl`, `.json`, `.parquet` or a directory saved with
            `Dataset.save_to_disk`), required for `"layoutsam"`.
        layoutsam_image_dir (`str`, *optional*): directory that relative LayoutSAM image paths are relative to.
        layoutsam_eval_file (`str`, *optional*): LayoutSAM eval rows; without it eval rows are split off train.
        min_box_area (`float`, *optional*, defaults to `0.002`): boxes under this fraction of the image are dropped.
        max_entities (`int`, *optional*, defaults to `10`): most entities per layout; the largest boxes are kept.
        on_bad_sample (`str`, *optional*, defaults to `"skip"`): an unusable layout or image is skipped with a
            `BadSampleWarning` (`"skip"`) or raises a `ValueError` (`"raise"`).
        vq_batch_size (`int`, *optional*, defaults to `16`): images per image tokenizer call.
        cache_dir (`str`, *optional*): cache of loaded rows and image codes; defaults to `echogen_rl` under the
            `datasets` cache.
    """

    dataset: str = field(default="shapes", metadata={"help": "Data source.", "choices": list(DATASETS)})
    num_train_samples: int | None = field(
        default=2048, metadata={"help": "Shapes: images generated. COCO/LayoutSAM: cap on train rows (None: all)."}
    )
    num_eval_samples: int = field(default=64, metadata={"help": "Eval rows (generated, split off or a cap); 0: none."})
    dataset_seed: int = field(default=0, metadata={"help": "Shapes seed; eval uses dataset_seed + 1_000_003."})
    shapes_grid_size: int = field(default=8, metadata={"help": "Shapes cells per image side."})
    shapes_max_shapes: int = field(default=3, metadata={"help": "Most shapes per shapes image."})
    coco_instances_file: str | None = field(default=None, metadata={"help": "COCO instances JSON."})
    coco_captions_file: str | None = field(default=None, metadata={"help": "COCO captions JSON."})
    coco_image_dir: str | None = field(default=None, metadata={"help": "COCO image directory."})
    coco_eval_instances_file: str | None = field(default=None, metadata={"help": "COCO eval instances JSON."})
    coco_eval_captions_file: str | None = field(default=None, metadata={"help": "COCO eval captions JSON."})
    coco_eval_image_dir: str | None = field(default=None, metadata={"help": "COCO eval image directory."})
    layoutsam_file: str | None = field(default=None, metadata={"help": "LayoutSAM .jsonl/.json/.parquet or dir."})
    layoutsam_image_dir: str | None = field(default=None, metadata={"help": "Base of relative LayoutSAM paths."})
    layoutsam_eval_file: str | None = field(default=None, metadata={"help": "LayoutSAM eval rows."})
    min_box_area: float = field(default=0.002, metadata={"help": "Drop boxes under this fraction of the image."})
    max_entities: int = field(default=10, metadata={"help": "Most entities per layout (the largest are kept)."})
    on_bad_sample: str = field(
        default="skip", metadata={"help": "Bad layout or image: skip or raise.", "choices": list(BAD_SAMPLE_ACTIONS)}
    )
    vq_batch_size: int = field(default=16, metadata={"help": "Images per image tokenizer call."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache of loaded rows and image codes."})

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("on_bad_sample", self.on_bad_sample, BAD_SAMPLE_ACTIONS)
        check_int("num_train_samples", self.num_train_samples, 1, optional=self.dataset != "shapes")
        for name, minimum in (("num_eval_samples", 0), ("dataset_seed", 0), ("shapes_grid_size", 1)):
            check_int(name, getattr(self, name), minimum)
        for name in ("shapes_max_shapes", "max_entities", "vq_batch_size"):
            check_int(name, getattr(self, name), 1)
        area = self.min_box_area
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not 0 <= area < 1:
            raise ValueError(f"min_box_area must be a fraction in [0, 1), got {area!r}")
        if self.dataset == "shapes":
            try:
                self.shapes_config()
            except ValueError as err:
                raise ValueError(f"shapes_grid_size / shapes_max_shapes: {err}") from None
        elif self.dataset == "coco":
            _check_paths(self, ("coco_instances_file", "coco_captions_file", "coco_image_dir"), required=True)
            _check_paths(self, ("coco_eval_instances_file", "coco_eval_captions_file", "coco_eval_image_dir"))
        else:
            _check_paths(self, ("layoutsam_file",), required=True)

    def shapes_config(self) -> ShapesConfig:
        return ShapesConfig(grid_size=self.shapes_grid_size, max_shapes=self.shapes_max_shapes)


PROMPT_SOURCES = ("random", "dataset")


@dataclass
class CycleRLDataArguments(LayoutDataArguments):
    """CycleRL's prompts, as script arguments: the layouts of the dataset above, or random layouts.

    Args:
        prompt_source (`str`, *optional*, defaults to `"random"`):
            `"random"`: layouts drawn from `phrase_pool`; `"dataset"`: the layouts of the training dataset (no image
            is read or encoded).
        num_random_prompts (`int`, *optional*, defaults to `1024`):
            How many random layouts make the prompt dataset.
        phrase_pool (`list[str]`, *optional*):
            Phrases of the random layouts; by default the shapes world's ("red circle", ...).
        random_min_entities (`int`, *optional*, defaults to `1`), random_max_entities (`int`, *optional*, defaults to `3`):
            Entities per random layout.
        random_min_box_size (`float`, *optional*, defaults to `0.25`), random_max_box_size (`float`, *optional*, defaults to `0.5`):
            Side of the random boxes, as a fraction of the image.
        random_max_overlap (`float`, *optional*, defaults to `0.0`):
            Largest IoU between two boxes of a random layout.
        random_box_grid (`int`, *optional*):
            Snap random boxes to a grid of this many cells per side (8 for the shapes world).
    """

    prompt_source: str = field(
        default="random",
        metadata={
            "help": "Prompts from random layouts or from the dataset's layouts.",
            "choices": list(PROMPT_SOURCES),
        },
    )
    num_random_prompts: int = field(default=1024, metadata={"help": "Number of random layouts."})
    phrase_pool: list[str] | None = field(
        default=None, metadata={"help": "Phrases of random layouts (default: shapes)."}
    )
    random_min_entities: int = field(default=1, metadata={"help": "Fewest entities per random layout."})
    random_max_entities: int = field(default=3, metadata={"help": "Most entities per random layout."})
    random_min_box_size: float = field(
        default=0.25, metadata={"help": "Smallest random box side (fraction of the image)."}
    )
    random_max_box_size: float = field(
        default=0.5, metadata={"help": "Largest random box side (fraction of the image)."}
    )
    random_max_overlap: float = field(default=0.0, metadata={"help": "Largest IoU between boxes of a random layout."})
    random_box_grid: int | None = field(
        default=None, metadata={"help": "Snap random boxes to this grid (8 for shapes)."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("prompt_source", self.prompt_source, PROMPT_SOURCES)
        check_int("num_random_prompts", self.num_random_prompts, 1)
        if not 1 <= self.random_min_entities <= self.random_max_entities:
            raise ValueError(
                "random_min_entities / random_max_entities: need 1 <= min <= max, "
                f"got {self.random_min_entities}, {self.random_max_entities}"
            )
        if not 0 < self.random_min_box_size <= self.random_max_box_size < 1:
            raise ValueError(
                "random_min_box_size / random_max_box_size: need 0 < min <= max < 1, "
                f"got {self.random_min_box_size}, {self.random_max_box_size}"
            )

    def random_layout_kwargs(self) -> dict:
        """The keyword arguments of [`random_layout`] these fields set."""
        return {
            "min_entities": self.random_min_entities,
            "max_entities": self.random_max_entities,
            "min_box_size": self.random_min_box_size,
            "max_box_size": self.random_max_box_size,
            "max_overlap": self.random_max_overlap,
            "grid_size": self.random_box_grid,
        }


def _check_paths(args: LayoutDataArguments, names: tuple[str, ...], required: bool = False) -> None:
    """All of `names` must be set: always when `required`, else as soon as one of them is."""
    missing = [name for name in names if not getattr(args, name)]
    if missing and (required or len(missing) < len(names)):
        raise ValueError(f"dataset={args.dataset!r} needs {', '.join(names)}; missing {', '.join(missing)}")


def _load(args: LayoutDataArguments, split: str) -> tuple[datasets.Dataset, FilterStats]:
    filters = {k: getattr(args, k) for k in ("min_box_area", "max_entities", "on_bad_sample", "cache_dir")}
    if args.dataset == "coco":
        prefix = "coco_eval" if split == "eval" else "coco"
        files = (getattr(args, f"{prefix}_{name}") for name in ("instances_file", "captions_file", "image_dir"))
        return load_coco(*files, **filters)
    source = args.layoutsam_eval_file if split == "eval" else args.layoutsam_file
    return load_layoutsam(source, args.layoutsam_image_dir, **filters)


def _limit(dataset: datasets.Dataset, limit: int | None, stats: FilterStats) -> datasets.Dataset:
    if limit is None or len(dataset) <= limit:
        return dataset
    stats.rows_beyond_limit += len(dataset) - limit
    return dataset.select(range(limit))


def _check_train(name: str, splits: list[datasets.Dataset], stats: FilterStats, when: str) -> None:
    if len(splits[0]) == 0:
        raise ValueError(
            f"The {name} train set is empty {when} ({sum(map(len, splits[1:]))} rows went to eval): "
            f"{stats.summary()}. Check the data paths, min_box_area and max_entities."
        )


def vq_tokenizer_for(args: LayoutDataArguments, model) -> ImageTokenizer | None:
    """The tokenizer that encodes `args`' images: none for shapes (its rows carry exact palette codes), else the
    model's own VQ model, `vq_batch_size` images per call."""
    if args.dataset == "shapes":
        return None
    return JanusVQTokenizer.from_model(model, batch_size=args.vq_batch_size)


def build_layout_datasets(
    args: LayoutDataArguments, image_tokenizer: ImageTokenizer | None = None, encode: bool = True
) -> tuple[datasets.Dataset, datasets.Dataset | None, FilterStats]:
    """The train and eval datasets of `args`, with at least the columns `caption`, `layout` and `image_codes`.

    Shapes come with their codes. COCO and LayoutSAM are loaded, filtered, limited to `num_train_samples` /
    `num_eval_samples` and encoded. Without eval files the last `num_eval_samples` rows are the eval split, taken
    before the train limit so that the splits never overlap.

    Args:
        args (`LayoutDataArguments`): the data to build.
        image_tokenizer (`ImageTokenizer`, *optional*): encodes COCO and LayoutSAM images (required for them); its
            `cache_key` keys the code cache, see [`encode_image_codes`].
        encode (`bool`, *optional*, defaults to `True`): `False` returns the layouts alone, without reading a
            pixel (CycleRL's prompts): no `image_codes`, and no tokenizer needed. LayoutSAM rows without `width` and
            `height` still open each image's header for its size, since their boxes are in pixels.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset | None, FilterStats]`: train, eval (`None` when
        `num_eval_samples` is 0 or no row is left) and the counts over both.

    Raises:
        `ValueError`: if no train row is left, checked before encoding and again after dropping unreadable images.
    """
    if args.dataset == "shapes":
        config, eval_dataset = args.shapes_config(), None
        train = build_shapes_dataset(args.num_train_samples, args.dataset_seed, config)
        if args.num_eval_samples:
            eval_dataset = build_shapes_dataset(args.num_eval_samples, args.dataset_seed + EVAL_SEED_OFFSET, config)
        rows = args.num_train_samples + args.num_eval_samples
        stats = FilterStats(rows_in=rows, rows_kept=rows)
        logger.info("shapes data: %s", stats.summary())
        return train, eval_dataset, stats
    if encode and image_tokenizer is None:
        raise ValueError(f"dataset={args.dataset!r} needs an image_tokenizer to encode its images")

    train, stats = _load(args, "train")
    separate_eval = bool(args.coco_eval_instances_file if args.dataset == "coco" else args.layoutsam_eval_file)
    eval_dataset = None
    if args.num_eval_samples and separate_eval:
        eval_dataset, eval_stats = _load(args, "eval")
        stats += eval_stats
        eval_dataset = _limit(eval_dataset, args.num_eval_samples, stats)
    elif args.num_eval_samples:
        split = max(0, len(train) - args.num_eval_samples)
        eval_dataset, train = train.select(range(split, len(train))), train.select(range(split))
    train = _limit(train, args.num_train_samples, stats)

    splits = [train] + ([eval_dataset] if eval_dataset is not None and len(eval_dataset) else [])
    stats.rows_kept = sum(map(len, splits))
    _check_train(args.dataset, splits, stats, "after filtering the annotations")
    for i, dataset in enumerate(splits if encode else []):
        splits[i], encode_stats = encode_image_codes(
            dataset, image_tokenizer, args.vq_batch_size, args.on_bad_sample, image_tokenizer.cache_key
        )
        stats.bad_images += encode_stats.bad_images
        stats.rows_kept -= encode_stats.bad_images
    if encode:
        _check_train(args.dataset, splits, stats, "after dropping unreadable images")
    logger.info("%s data: %s", args.dataset, stats.summary())
    return splits[0], (splits[1] if len(splits) > 1 and len(splits[1]) else None), stats
