"""`echogen-rl generate` and `echogen-rl ground`: one model, both directions, from the command line.

    echogen-rl generate --model DIR --caption "two shapes" --box "red square:0.1,0.1,0.5,0.5" --out sample.png
    echogen-rl ground --model DIR --image sample-0.png --phrases "red square" --draw grounded.png

Images are decoded with the model's own VQ decoder. A model whose codebook is the shapes palette (the offline tiny
checkpoint) has a random VQ decoder: `--palette` decodes and encodes with the exact palette tokenizer instead, so
the shapes are visible and grounding reads what was drawn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from echogen_rl.eval.inference import generate_images
from echogen_rl.eval.visualize import RECOVERED_COLOR, draw_layout, image_grid, overlay, save_png
from echogen_rl.layout import Entity, Layout, LayoutError, validate_layout
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.image_tokenizers import ImageTokenizer, JanusVQTokenizer, PaletteTokenizer
from echogen_rl.models.loading import load_model
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.models.palette import PALETTE
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.sampling import resolve_guidance_scale, resolve_temperature

logger = logging.getLogger(__name__)


def image_tokenizer_for(model: torch.nn.Module, palette: bool = False) -> ImageTokenizer:
    """The model's VQ tokenizer, or the shapes palette tokenizer at the same grid and image size."""
    vq = JanusVQTokenizer.from_model(model, show_progress=False)
    if not palette:
        return vq
    if vq.codebook_size != len(PALETTE):
        raise ValueError(
            f"--palette: the model's codebook has {vq.codebook_size} codes, not the {len(PALETTE)} of the shapes "
            "palette; decode with its own VQ model (drop --palette)"
        )
    return PaletteTokenizer(vq.grid_size, vq.image_size // vq.grid_size)


def parse_box(spec: str) -> Entity:
    """`"red square:0.1,0.2,0.5,0.6"` as an entity; the error names the box and the value at fault."""
    phrase, sep, coords = spec.rpartition(":")
    if not sep or not phrase.strip():
        raise LayoutError(f'--box {spec!r}: expected "phrase:x1,y1,x2,y2"')
    parts = coords.split(",")
    if len(parts) != 4:
        raise LayoutError(f"--box {spec!r}: expected 4 numbers x1,y1,x2,y2 after the ':', got {len(parts)}")
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        raise LayoutError(f"--box {spec!r}: {coords!r} holds a non-number") from None
    entity = Entity(" ".join(phrase.split()), box)
    try:
        validate_layout(Layout([entity]))
    except LayoutError as err:
        raise LayoutError(f"--box {spec!r}: {str(err).removeprefix('entity 0: ')}") from None
    return entity


def read_layout(layout_file: str | None, caption: str | None, boxes: Sequence[str]) -> Layout:
    """The layout of `--layout FILE.json` (its caption replaced by `--caption` if given), or of `--box` specs."""
    if layout_file is None:
        return Layout([parse_box(spec) for spec in boxes], caption or "")
    path = Path(layout_file)
    if not path.is_file():
        raise FileNotFoundError(f"--layout {path}: no such file")
    try:
        layout = Layout.from_json(path.read_text())
        validate_layout(layout)
    except LayoutError as err:
        raise LayoutError(f"--layout {path}: {err}") from None
    if caption is not None:
        layout.caption = caption
    return layout


def _png_path(out: str | os.PathLike, flag: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{flag} {path}: must name a .png file")
    return path


def run_generate(
    model_name_or_path: str,
    layout: Layout,
    out: str | os.PathLike,
    adapter: str | None = None,
    num_images: int = 4,
    seed: int = 0,
    guidance_scale: float | None = None,
    temperature: float | None = None,
    palette: bool = False,
    batch_size: int = 16,
    device: str | None = None,
) -> list[Path]:
    """`echogen-rl generate`: `num_images` images for one layout, as `OUT-0.png`, ... and a grid `OUT.png`.

    Args:
        model_name_or_path (`str`): a Janus checkpoint directory or hub id.
        layout (`Layout`): the caption and boxes.
        out (`str` or `os.PathLike`): the grid's path, ending in `.png`; the images go beside it.
        adapter (`str`, *optional*): a PEFT adapter directory, merged into the model.
        num_images (`int`, *optional*, defaults to `4`): images sampled.
        seed (`int`, *optional*, defaults to `0`): sampling seed.
        guidance_scale (`float`, *optional*): classifier-free guidance scale; by default the one the checkpoint
            records (see `echogen_rl.models.sampling`).
        temperature (`float`, *optional*): `0` decodes greedily; by default the checkpoint's (1 unless recorded).
        palette (`bool`, *optional*, defaults to `False`): decode with the shapes palette tokenizer.
        batch_size (`int`, *optional*, defaults to `16`): images per rollout (changes the sampled images).
        device (`str`, *optional*): defaults to CUDA when available, else the CPU.

    Returns:
        `list[Path]`: the images, then the grid.
    """
    grid_path = _png_path(out, "--out")
    if num_images < 1:
        raise ValueError(f"--num must be >= 1, got {num_images}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    model, tokenizer = load_model(model_name_or_path, adapter, device)
    guidance_scale = resolve_guidance_scale(model, guidance_scale, "generate --guidance-scale")
    temperature = resolve_temperature(model, temperature)
    decoder = image_tokenizer_for(model, palette)
    if not palette and decoder.codebook_size == len(PALETTE):
        logger.warning("this model's codebook is the shapes palette: pass --palette to see the shapes")
    codes = generate_images(model, tokenizer, [layout] * num_images, guidance_scale, temperature, seed, batch_size)
    images = decoder.decode(codes)
    paths = [save_png(im, grid_path.with_name(f"{grid_path.stem}-{i}.png")) for i, im in enumerate(images)]
    size = max(256, decoder.image_size)
    tiles = [overlay(im, layout, size=size) for im in images]
    paths.append(save_png(image_grid(tiles, columns=min(4, len(tiles))), grid_path))
    return paths


def parse_phrases(text: str) -> list[str]:
    """`"red square; blue circle"` as a list of whitespace-normalized phrases; none may be empty."""
    phrases = [" ".join(p.split()) for p in text.split(";")]
    if not all(phrases):
        raise ValueError(f'--phrases {text!r}: expected phrases separated by ";", with none empty')
    return phrases


def read_image(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path}: not a readable image ({err})") from err


def _as_read(picture: Image.Image, palette: bool) -> Image.Image:
    """The square the boxes refer to: the palette tokenizer resizes the whole image, the VQ one center-crops it."""
    if palette:
        return picture
    side = min(picture.size)
    left, top = (picture.width - side) // 2, (picture.height - side) // 2
    return picture.crop((left, top, left + side, top + side))


def run_ground(
    model_name_or_path: str,
    image: str | os.PathLike,
    phrases: Sequence[str] | None,
    adapter: str | None = None,
    draw: str | os.PathLike | None = None,
    palette: bool = False,
    device: str | None = None,
) -> dict:
    """`echogen-rl ground`: the model's layout for an image, as a JSON-ready dict.

    Args:
        model_name_or_path (`str`): a Janus checkpoint directory or hub id.
        image (`str` or `os.PathLike`): the image file.
        phrases (`Sequence[str]`, *optional*): what to locate, in order; `None` detects all objects.
        adapter (`str`, *optional*): a PEFT adapter directory, merged into the model.
        draw (`str` or `os.PathLike`, *optional*): a `.png` path for the image with the boxes drawn.
        palette (`bool`, *optional*, defaults to `False`): encode with the shapes palette tokenizer.
        device (`str`, *optional*): defaults to CUDA when available, else the CPU.

    Returns:
        `dict`: `image`, `phrases`, `layout` (caption and entities), `problems` (empty for a clean answer) and
        `text` (the model's answer). Boxes are normalized to the square the tokenizer reads: the whole image for
        `palette`, else its center square (the VQ tokenizer center-crops).
    """
    draw_path = _png_path(draw, "--draw") if draw is not None else None
    picture = read_image(image)
    model, tokenizer = load_model(model_name_or_path, adapter, device)
    codes = image_tokenizer_for(model, palette).encode([picture])
    prompts = PromptBuilder(tokenizer, unwrap_janus(model).config.vision_config.num_image_tokens)
    result = Grounder(model, prompts)(codes, None if phrases is None else [list(phrases)])[0]
    if draw_path is not None:
        save_png(draw_layout(_as_read(picture, palette), result.layout, RECOVERED_COLOR, 256), draw_path)
    return {
        "image": str(image),
        "phrases": None if phrases is None else list(phrases),
        "layout": result.layout.to_dict(),
        "problems": result.problems,
        "text": result.text,
    }
