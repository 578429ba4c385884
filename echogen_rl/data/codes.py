"""Image codes: [`encode_image_codes`] adds each row's image as VQ codes, cached by `datasets` per rows and
tokenizer, dropping (or raising on) the rows whose image cannot be read, on a cache hit as well as a miss."""

from __future__ import annotations

import datasets
from datasets.fingerprint import Hasher
from PIL import Image

from echogen_rl.data.common import (
    BAD_SAMPLE_ACTIONS,
    FilterStats,
    check_choice,
    check_int,
    describe_image,
    open_image,
    report_bad,
)
from echogen_rl.models.image_tokenizers import ImageTokenizer


def encode_image_codes(
    dataset: datasets.Dataset,
    image_tokenizer: ImageTokenizer,
    batch_size: int = 16,
    on_bad_sample: str = "skip",
    cache_key: str | None = None,
) -> tuple[datasets.Dataset, FilterStats]:
    """Adds the column `image_codes`: each row's image (from `image_path`, else `image`) encoded in batches.

    An image that cannot be read (missing, corrupted) drops its row alone, never its batch. The codes are cached by
    `datasets` next to the dataset's files under a fingerprint of `dataset._fingerprint` and `cache_key`, so a second
    call on the same rows with the same key encodes nothing. The fingerprint is not left to `datasets`, which would
    hash the map function and with it the tokenizer's model: slow, and not stable across runs. Datasets held in
    memory are never cached, which is why [`load_coco`] and [`load_layoutsam`] return file-backed ones.

    Args:
        dataset (`datasets.Dataset`): rows with an `image_path` or `image` column.
        image_tokenizer (`ImageTokenizer`): encodes a list of RGB images to codes `[B, N]`.
        batch_size (`int`, *optional*, defaults to `16`): images per `image_tokenizer.encode` call.
        on_bad_sample (`str`, *optional*, defaults to `"skip"`): an unreadable image drops its row with a
            `BadSampleWarning` naming the file or row (`"skip"`), or raises a `ValueError` naming it (`"raise"`).
        cache_key (`str`, *optional*): identifies the tokenizer and its weights (e.g. model path, grid and codebook
            size): tokenizers with the same key must give the same codes. `None` disables caching.

    Returns:
        `tuple[datasets.Dataset, FilterStats]`: the rows whose image was read, with `image_codes`, and the counts.
    """
    check_choice("on_bad_sample", on_bad_sample, BAD_SAMPLE_ACTIONS)
    check_int("batch_size", batch_size, 1)
    image_columns = [c for c in ("image_path", "image") if c in dataset.column_names]
    if not image_columns:
        raise ValueError(f"the dataset has no image_path or image column (columns: {dataset.column_names})")
    # Decoding is done here rather than by `datasets`, which would fail the whole map on the first corrupted image.
    decoded_feature = dataset.features.get("image")
    if isinstance(decoded_feature, datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    encode_batch = _batch_encoder(image_tokenizer, image_columns, on_bad_sample)
    features = dataset.features.copy()
    features["image_codes"] = datasets.List(datasets.Value("int64"))
    features["image_error"] = datasets.Value("string")
    cached = cache_key is not None
    encoded = dataset.map(
        encode_batch,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        features=features,
        desc="VQ encode",
        new_fingerprint=Hasher.hash((dataset._fingerprint, cache_key)) if cached else None,
        keep_in_memory=not cached,
        load_from_cache_file=cached,
    )
    # Bad rows are reported after the map, not inside it, so that a cache hit warns (or raises) about them as well.
    stats = FilterStats(rows_in=len(encoded))
    errors = list(encoded["image_error"])
    for message in filter(None, errors):
        stats.bad_images += 1
        report_bad(message, on_bad_sample)
    if stats.bad_images:
        encoded = encoded.select([i for i, message in enumerate(errors) if not message])
    encoded = encoded.remove_columns("image_error")
    if isinstance(decoded_feature, datasets.Image):
        encoded = encoded.cast_column("image", decoded_feature)
    stats.rows_kept = len(encoded)
    return encoded, stats


def _batch_encoder(image_tokenizer: ImageTokenizer, image_columns: list[str], on_bad_sample: str):
    """The batched map function of [`encode_image_codes`]: each row's image (the first of `image_columns` that is
    set) read and encoded, with `image_codes` `[]` and the reason in `image_error` for a row whose image cannot be
    read (or a `ValueError` with `on_bad_sample="raise"`)."""

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        refs = [next((v for v in values if v is not None), None) for values in zip(*(batch[c] for c in image_columns))]
        images: list[Image.Image | None] = []
        errors: list[str] = []
        for ref, index in zip(refs, indices):
            try:
                with open_image(ref) as image:
                    images.append(image.convert("RGB"))  # convert() decodes every pixel, so errors surface here
                errors.append("")
            except Exception as err:  # PIL raises many exception types on malformed files
                message = f"cannot read the image of {describe_image(ref, index)}: {type(err).__name__}: {err}"
                if on_bad_sample == "raise":
                    raise ValueError(message) from err
                images.append(None)
                errors.append(message)
        good = [image for image in images if image is not None]
        codes = iter(image_tokenizer.encode(good).tolist() if good else [])
        return {"image_codes": [next(codes) if image is not None else [] for image in images], "image_error": errors}

    return encode_batch
