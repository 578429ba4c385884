"""Pictures: images with their layouts drawn, and grids of them as PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from echogen_rl.layout import Layout

TARGET_COLOR = (40, 220, 80)
RECOVERED_COLOR = (255, 60, 200)


def draw_layout(
    image: Image.Image, layout: Layout, color: tuple[int, int, int] = TARGET_COLOR, size: int = 256, label: bool = True
) -> Image.Image:
    """`image` scaled to `size` pixels (nearest, so small code grids stay crisp) with `layout`'s boxes drawn.

    Args:
        image (`PIL.Image.Image`): the picture.
        layout (`Layout`): boxes in normalized xyxy.
        color (`tuple[int, int, int]`, *optional*): outline and label color.
        size (`int`, *optional*, defaults to `256`): output side in pixels.
        label (`bool`, *optional*, defaults to `True`): write each entity's phrase at its box.
    """
    canvas = image.convert("RGB").resize((size, size), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for entity in layout.entities:
        x1, y1, x2, y2 = (round(v * (size - 1)) for v in entity.box)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=2)
        if label:
            draw.text((x1 + 3, y1 + 2), entity.phrase, fill=color, font=font)
    return canvas


def overlay(image: Image.Image, target: Layout, recovered: Layout | None = None, size: int = 256) -> Image.Image:
    """Target boxes in green and, if given, recovered boxes in magenta on the same picture."""
    canvas = draw_layout(image, target, TARGET_COLOR, size)
    if recovered is not None:
        canvas = draw_layout(canvas, recovered, RECOVERED_COLOR, size, label=False)
    return canvas


def image_grid(
    images: Sequence[Image.Image], columns: int = 4, pad: int = 4, titles: Sequence[str] | None = None
) -> Image.Image:
    """Tiles equally sized images in rows of `columns`, with optional titles above each tile."""
    if not images:
        raise ValueError("image_grid: no images")
    w, h = images[0].size
    title_h = 14 if titles else 0
    rows = (len(images) + columns - 1) // columns
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad + title_h) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x = pad + (i % columns) * (w + pad)
        y = pad + (i // columns) * (h + pad + title_h)
        if titles:
            draw.text((x, y), titles[i][: w // 6], fill=(230, 230, 230), font=ImageFont.load_default())
        grid.paste(im.convert("RGB").resize((w, h)), (x, y + title_h))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Writes a PNG atomically (a temporary file renamed into place): never a half-written picture."""
    return save_image(image, path, "PNG")


def save_image(image: Image.Image, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Writes an image atomically, in `fmt` or the format its name asks for (JPEG at quality 95, as benchmark
    folders of `.jpg` names are read)."""
    path = Path(path)
    fmt = fmt or Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path.name}: no image format for the extension {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    tmp.replace(path)
    return path
