"""The offline default dataset: seeded procedural images of a few colored shapes on a black background.

An image is a `grid_size x grid_size` grid of cells, each `patch_size x patch_size` pixels and each exactly one
palette color: shapes are rasterized at cell granularity. A palette tokenizer (cell -> palette index) is therefore
exact, and a sample's image codes are simply its row-major cell palette indices. Because every image's colors are
distinct, the oracle detector [`detect_from_codes`] can read the layout back from the codes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import datasets
import numpy as np
from PIL import Image
from scipy import ndimage

from echogen_rl.layout import Entity, Layout
from echogen_rl.models.palette import COLOR_NAMES, PALETTE, SHAPES

# Below 3 cells a disk is a square and a triangle a rectangle, so these kinds only exist from 3 cells up.
MIN_ROUND_CELLS = 3
BLOB = "blob"
_PALETTE_RGB = np.array(PALETTE, dtype=np.uint8)


@dataclass
class ShapesConfig:
    """How shapes images are drawn.

    Args:
        grid_size (`int`, *optional*, defaults to `8`): cells per image side.
        patch_size (`int`, *optional*, defaults to `4`): pixels per cell side.
        min_shapes (`int`, *optional*, defaults to `1`): fewest shapes drawn per image. A target: a shape that cannot
            be placed after `max_placement_tries` tries is dropped, but the first shape always fits.
        max_shapes (`int`, *optional*, defaults to `3`): most shapes per image, at most the number of colors since
            the colors of an image are distinct.
        min_cells (`int`, *optional*, defaults to `2`): shortest shape side, in cells. Circles and triangles use
            at least 3.
        max_cells (`int`, *optional*, defaults to `4`): longest shape side, in cells.
        kinds (`tuple[str, ...]`, *optional*, defaults to `SHAPES`): the shape kinds drawn, uniformly.
        max_placement_tries (`int`, *optional*, defaults to `20`): random positions tried per shape before dropping it.
    """

    grid_size: int = 8
    patch_size: int = 4
    min_shapes: int = 1
    max_shapes: int = 3
    min_cells: int = 2
    max_cells: int = 4
    kinds: tuple[str, ...] = SHAPES
    max_placement_tries: int = 20

    def __post_init__(self):
        positive = (
            "grid_size",
            "patch_size",
            "min_shapes",
            "max_shapes",
            "min_cells",
            "max_cells",
            "max_placement_tries",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ShapesConfig.{name} must be a positive int, got {value!r}")
        if self.max_shapes < self.min_shapes:
            raise ValueError(f"ShapesConfig.max_shapes ({self.max_shapes}) is below min_shapes ({self.min_shapes})")
        if self.max_shapes > len(COLOR_NAMES):
            raise ValueError(f"ShapesConfig.max_shapes ({self.max_shapes}) exceeds the {len(COLOR_NAMES)} colors")
        if self.max_cells < self.min_cells:
            raise ValueError(f"ShapesConfig.max_cells ({self.max_cells}) is below min_cells ({self.min_cells})")
        if self.max_cells > self.grid_size:
            raise ValueError(f"ShapesConfig.max_cells ({self.max_cells}) exceeds grid_size ({self.grid_size})")
        self.kinds = tuple(self.kinds)
        if not self.kinds or len(set(self.kinds)) != len(self.kinds) or not set(self.kinds) <= set(SHAPES):
            raise ValueError(f"ShapesConfig.kinds must be distinct kinds among {SHAPES}, got {self.kinds!r}")
        if {"circle", "triangle"} & set(self.kinds) and self.max_cells < MIN_ROUND_CELLS:
            raise ValueError(f"ShapesConfig.max_cells must be >= {MIN_ROUND_CELLS} to draw circles or triangles")
        if "rectangle" in self.kinds and self.min_cells == self.max_cells:
            raise ValueError("ShapesConfig.max_cells must exceed min_cells to draw rectangles (sides differ)")

    @property
    def image_size(self) -> int:
        return self.grid_size * self.patch_size


@dataclass
class ShapesSample:
    """One generated image.

    Args:
        caption (`str`): a sentence naming every shape, e.g. `"an image of a red circle on a black background"`.
        layout (`Layout`): the shapes as entities (`"<color> <kind>"`, cell-aligned box), with the caption.
        codes (`list[int]`): the row-major cell palette indices, `grid_size**2` of them.
        image (`PIL.Image.Image`): the RGB rendering of `codes`.
    """

    caption: str
    layout: Layout
    codes: list[int]
    image: Image.Image


@cache
def shape_mask(kind: str, width: int, height: int) -> np.ndarray | None:
    """The canonical cell mask of a shape kind filling a `width x height` box, or `None` if the kind has no mask there.

    Every mask touches all four sides of its box, so the bounding box of a drawn shape is exactly its box; and the
    masks of different kinds for one box differ, so [`detect_from_codes`] can classify a shape by exact match.

    Args:
        kind (`str`): one of `SHAPES`.
        width (`int`): box width in cells.
        height (`int`): box height in cells.

    Returns:
        `np.ndarray | None`: a read-only `(height, width)` bool array (it is cached and shared).
    """
    if width < 1 or height < 1:
        return None
    if (kind == "square" and width == height) or (kind == "rectangle" and width != height):
        mask = np.ones((height, width), dtype=bool)
    elif kind == "circle" and width == height >= MIN_ROUND_CELLS:
        # Cells whose centers lie within sqrt(r^2 + r/2) of the box center, r = (n - 1) / 2: this radius always
        # reaches the middle of each side but never a corner, so the disk is neither cut short nor a square.
        r = (width - 1) / 2
        offsets = np.arange(width) - r
        mask = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= r * r + r / 2
    elif kind == "triangle" and min(width, height) >= MIN_ROUND_CELLS:
        # Isosceles, pointing up: rows centered and widening linearly from a 1-cell (odd width) or 2-cell (even
        # width) apex to the full bottom row; widths keep the parity of `width` so every row is centered exactly.
        apex = 2 - width % 2
        half_steps = np.floor((width - apex) / 2 * np.arange(height) / (height - 1) + 0.5).astype(int)
        row_widths = apex + 2 * half_steps
        cols = np.arange(width)
        lo = (width - row_widths) // 2
        mask = (cols[None, :] >= lo[:, None]) & (cols[None, :] < (lo + row_widths)[:, None])
    else:
        return None
    mask.setflags(write=False)
    return mask


def phrase_pool(config: ShapesConfig | None = None) -> list[str]:
    """Every `"<color> <kind>"` phrase the config can draw, colors outer and kinds inner, in palette order."""
    config = config or ShapesConfig()
    return [f"{color} {kind}" for color in COLOR_NAMES for kind in config.kinds]


def make_caption(phrases: Sequence[str]) -> str:
    """A caption naming the phrases in order, built only from `CAPTION_WORDS`, color and kind names."""
    # Captions avoid punctuation: the tiny checkpoint's tokenizer only knows whole words.
    items = " and ".join(f"{'an' if p[0] in 'aeiou' else 'a'} {p}" for p in phrases)
    return f"an image of {items} on a black background"


def _entity_key(entity: Entity) -> tuple:
    # Reading order (top to bottom, then left to right); shared by the generator and the detector so that a clean
    # sample's layout and its detection compare equal entity for entity.
    x1, y1, x2, y2 = entity.box
    return (y1, x1, y2, x2, entity.phrase)


def _cell_box(entity: Entity, grid_size: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (round(v * grid_size) for v in entity.box)
    return x1, y1, x2, y2


def render_codes(layout: Layout, config: ShapesConfig | None = None) -> list[int]:
    """Draws a layout of `"<color> <kind>"` entities into image codes.

    Boxes are snapped to the nearest cell edges; later entities overwrite earlier ones where they overlap.

    Args:
        layout (`Layout`): entities whose phrases are `"<color> <kind>"` with a palette color and a kind of `SHAPES`.
        config (`ShapesConfig`, *optional*, defaults to `ShapesConfig()`): the grid.

    Returns:
        `list[int]`: the row-major cell palette indices, `grid_size**2` of them.

    Raises:
        ValueError: an entity's phrase is not `"<color> <kind>"`, its box leaves the grid, or its kind has no mask
            at its box size (e.g. a circle in a non-square box).
    """
    config = config or ShapesConfig()
    grid = np.zeros((config.grid_size, config.grid_size), dtype=np.int64)
    for i, entity in enumerate(layout.entities):
        code, kind, (x1, y1, x2, y2) = _drawable(i, entity, config.grid_size)
        mask = shape_mask(kind, x2 - x1, y2 - y1)
        if mask is None:
            raise ValueError(f"entity {i}: a {kind} cannot be drawn in a {x2 - x1}x{y2 - y1} cell box")
        grid[y1:y2, x1:x2][mask] = code
    return grid.ravel().tolist()


def _drawable(i: int, entity: Entity, grid_size: int) -> tuple[int, str, tuple[int, int, int, int]]:
    # The entity's palette code, kind and cell box; a ValueError naming entity `i` if it cannot be drawn.
    color, _, kind = entity.phrase.partition(" ")
    if color not in COLOR_NAMES or kind not in SHAPES:
        raise ValueError(f"entity {i}: phrase {entity.phrase!r} is not '<color> <kind>'")
    x1, y1, x2, y2 = _cell_box(entity, grid_size)
    if not 0 <= x1 < x2 <= grid_size or not 0 <= y1 < y2 <= grid_size:
        raise ValueError(f"entity {i}: box {entity.box} is empty or outside the {grid_size}x{grid_size} grid")
    return COLOR_NAMES.index(color) + 1, kind, (x1, y1, x2, y2)


def render_filled_boxes(layout: Layout, config: ShapesConfig | None = None) -> list[int]:
    """Draws every entity of a layout as its whole box filled with its color, whatever its kind: the "blob" a
    generator that learned only where and which color paints. Checks the layout as [`render_codes`] does, except that
    any box size is drawable.
    """
    config = config or ShapesConfig()
    grid = np.zeros((config.grid_size, config.grid_size), dtype=np.int64)
    for i, entity in enumerate(layout.entities):
        code, _, (x1, y1, x2, y2) = _drawable(i, entity, config.grid_size)
        grid[y1:y2, x1:x2] = code
    return grid.ravel().tolist()


def _as_grid(codes: Sequence[int] | np.ndarray, grid_size: int) -> np.ndarray:
    grid = np.asarray(codes, dtype=np.int64)
    if grid.size != grid_size * grid_size:
        raise ValueError(f"expected {grid_size * grid_size} codes for a {grid_size}x{grid_size} grid, got {grid.size}")
    grid = grid.reshape(grid_size, grid_size)
    # Model-generated grids may hold any token id; ids outside the palette carry no color, so they read as background.
    return np.where((grid >= 0) & (grid < len(PALETTE)), grid, 0)


def codes_to_image(codes: Sequence[int] | np.ndarray, config: ShapesConfig | None = None) -> Image.Image:
    """The RGB image of a code grid: each cell a `patch_size` square of its palette color.

    Args:
        codes (`Sequence[int]` or `np.ndarray`): `grid_size**2` codes, row-major (flat or `(grid, grid)`). Codes
            outside `[0, len(PALETTE))` are drawn as background.
        config (`ShapesConfig`, *optional*, defaults to `ShapesConfig()`): the grid and patch sizes.
    """
    config = config or ShapesConfig()
    p = config.patch_size
    pixels = _PALETTE_RGB[_as_grid(codes, config.grid_size)].repeat(p, axis=0).repeat(p, axis=1)
    return Image.fromarray(pixels)  # (H, W, 3) uint8 reads as RGB


def detect_from_codes(codes: Sequence[int] | np.ndarray, config: ShapesConfig | None = None) -> Layout:
    """The oracle detector: reads the shapes of a code grid back as a layout.

    Each 4-connected component of one color is an entity whose box is its cell bounding box over `grid_size`. Its
    kind is the kind whose canonical [`shape_mask`] for that box equals the component exactly, else `"blob"` (a
    word outside `SHAPES`, so such an entity never matches a generated phrase). On clean samples this recovers the
    generated layout's entities exactly. Any code grid is accepted: codes outside `[0, len(PALETTE))` read as
    background, and only a grid of the wrong size raises.

    Args:
        codes (`Sequence[int]` or `np.ndarray`): `grid_size**2` codes, row-major (flat or `(grid, grid)`).
        config (`ShapesConfig`, *optional*, defaults to `ShapesConfig()`): the grid size.

    Returns:
        `Layout`: the entities in reading order (top, then left), with an empty caption.
    """
    config = config or ShapesConfig()
    g = config.grid_size
    grid = _as_grid(codes, g)
    entities = []
    for code in np.unique(grid[grid > 0]).tolist():
        labels, _ = ndimage.label(grid == code)  # the default structure is 4-connectivity
        for label, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[rows, cols] == label
            h, w = component.shape
            kind = next((k for k in SHAPES if np.array_equal(shape_mask(k, w, h), component)), BLOB)
            box = (cols.start / g, rows.start / g, cols.stop / g, rows.stop / g)
            entities.append(Entity(f"{COLOR_NAMES[code - 1]} {kind}", box))
    return Layout(sorted(entities, key=_entity_key))


def _sample_size(rng: np.random.Generator, kind: str, config: ShapesConfig) -> tuple[int, int]:
    lo, hi = config.min_cells, config.max_cells
    if kind in ("circle", "triangle"):
        lo = max(lo, MIN_ROUND_CELLS)
    width = int(rng.integers(lo, hi + 1))
    if kind in ("square", "circle"):
        return width, width
    if kind == "rectangle":
        # Draw the height from the range without `width` so the sides always differ.
        height = int(rng.integers(lo, hi))
        return width, height + (height >= width)
    return width, int(rng.integers(lo, hi + 1))


def sample_shapes(seed: int | np.random.SeedSequence, config: ShapesConfig | None = None) -> ShapesSample:
    """Generates one image of distinct-colored, non-overlapping shapes; the same seed gives the same sample.

    Shapes get distinct colors so that their phrases are unique and the oracle never merges two of them, and
    their boxes never intersect (a stronger guarantee than disjoint cells). A shape that finds no free position in
    `config.max_placement_tries` tries is dropped, so an image may hold fewer than `min_shapes` shapes.

    Args:
        seed (`int` or `np.random.SeedSequence`): seeds a private `np.random.default_rng`; the global RNG is unused.
        config (`ShapesConfig`, *optional*, defaults to `ShapesConfig()`): what to draw.
    """
    config = config or ShapesConfig()
    rng = np.random.default_rng(seed)
    g = config.grid_size
    occupied = np.zeros((g, g), dtype=bool)
    num_shapes = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    colors = rng.permutation(len(COLOR_NAMES))[:num_shapes].tolist()
    entities = []
    for color in colors:
        kind = config.kinds[int(rng.integers(len(config.kinds)))]
        width, height = _sample_size(rng, kind, config)
        for _ in range(config.max_placement_tries):
            x, y = int(rng.integers(g - width + 1)), int(rng.integers(g - height + 1))
            if not occupied[y : y + height, x : x + width].any():
                occupied[y : y + height, x : x + width] = True
                box = (x / g, y / g, (x + width) / g, (y + height) / g)
                entities.append(Entity(f"{COLOR_NAMES[color]} {kind}", box))
                break
    entities.sort(key=_entity_key)
    caption = make_caption([e.phrase for e in entities])
    layout = Layout(entities, caption)
    codes = render_codes(layout, config)
    return ShapesSample(caption, layout, codes, codes_to_image(codes, config))


def build_shapes_dataset(num_samples: int, seed: int = 0, config: ShapesConfig | None = None) -> datasets.Dataset:
    """A dataset of shapes samples with columns `caption`, `layout` (JSON, see `Layout.to_json`), `image` and
    `image_codes`.

    Row `i` is `sample_shapes(np.random.SeedSequence([seed, i]), config)`, so a row never depends on `num_samples`
    and datasets built from different seeds (e.g. train and test splits) are independent streams.

    Args:
        num_samples (`int`): number of rows.
        seed (`int`, *optional*, defaults to `0`): the dataset seed.
        config (`ShapesConfig`, *optional*, defaults to `ShapesConfig()`): what to draw.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    config = config or ShapesConfig()
    samples = [sample_shapes(np.random.SeedSequence([seed, i]), config) for i in range(num_samples)]
    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "layout": datasets.Value("string"),
            "image": datasets.Image(),
            "image_codes": datasets.List(datasets.Value("int64")),
        }
    )
    columns = {
        "caption": [s.caption for s in samples],
        "layout": [s.layout.to_json() for s in samples],
        "image": [s.image for s in samples],
        "image_codes": [s.codes for s in samples],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def is_shapes_phrase(phrase: str) -> bool:
    """Whether a phrase is the shapes world's `"<color> <kind>"`."""
    color, _, kind = " ".join(phrase.lower().split()).partition(" ")
    return color in COLOR_NAMES and kind in SHAPES
