"""Shapes world: a layout's entities drawn or asked as another kind (or drawn in another color), so that a grounder
(and a reward read by it) must judge a shape's kind and color, not only its place: the drawings of
[`draw_other_kinds`] and [`draw_other_colors`], and the grounding negatives of [`KindNegatives`]."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from echogen_rl.data.shapes import ShapesConfig, _cell_box, _drawable, is_shapes_phrase, render_codes, shape_mask
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.palette import COLOR_NAMES, SHAPES


def other_kind_masks(kind: str, width: int, height: int) -> list[np.ndarray]:
    """The drawings of a `width x height` box that are *not* a `kind`: the filled box and every other kind's mask
    there, each different from `kind`'s own mask (a filled box is a square's or a rectangle's own drawing, so it
    is no alternative for them). Empty where only `kind` fits, e.g. a 2 x 2 square."""
    own = shape_mask(kind, width, height)
    out: list[np.ndarray] = []
    for mask in (np.ones((height, width), dtype=bool), *(shape_mask(k, width, height) for k in SHAPES)):
        if mask is None or (own is not None and np.array_equal(mask, own)):
            continue
        if not any(np.array_equal(mask, seen) for seen in out):
            out.append(mask)
    return out


def redraw_entity(codes: Sequence[int], entity: Entity, mask: np.ndarray, grid_size: int) -> list[int]:
    """The code grid with `entity`'s shape replaced by `mask` (its box's size) in the entity's color: its own
    cells in the box cleared first, other colors' cells left as they are."""
    code, _, (x1, y1, x2, y2) = _drawable(0, entity, grid_size)
    grid = np.asarray(codes, dtype=np.int64).reshape(grid_size, grid_size).copy()
    box = grid[y1:y2, x1:x2]
    box[box == code] = 0
    box[mask & (box == 0)] = code
    return grid.ravel().tolist()


def draw_other_kinds(layout: Layout, config: ShapesConfig | None = None) -> list[int]:
    """Draws every entity of a layout as another kind in its box, in its color: a circle or a triangle where one
    fits and differs from the entity's own kind, else the filled box (a rectangle, for a triangle in an oblong box).
    An entity for which nothing else fits its box (a 2 x 2 square) is drawn as itself."""
    config = config or ShapesConfig()
    codes = render_codes(layout, config)
    for i, entity in enumerate(layout.entities):
        _, kind, (x1, y1, x2, y2) = _drawable(i, entity, config.grid_size)
        others = other_kind_masks(kind, x2 - x1, y2 - y1)
        if others:
            shaped = [m for m in others if not m.all()]
            codes = redraw_entity(codes, entity, (shaped or others)[0], config.grid_size)
    return codes


def draw_other_colors(layout: Layout, config: ShapesConfig | None = None) -> list[int]:
    """Draws every entity of a layout as its own kind in its box, in a color that no phrase of the layout names
    (the unused colors in palette order, entity by entity, reused when there are fewer unused colors than entities):
    where and which shapes are right, every color is wrong. A grounder that reads color answers each phrase "not
    present"; one that reads only place and shape boxes them all."""
    config = config or ShapesConfig()
    used = {e.phrase.partition(" ")[0] for e in layout.entities}
    unused = [c for c in COLOR_NAMES if c not in used]
    if not unused:
        raise ValueError(f"draw_other_colors: the layout names every color of the palette: {layout.phrases}")
    recolored = [
        Entity(f"{unused[i % len(unused)]} {e.phrase.partition(' ')[2]}", e.box) for i, e in enumerate(layout.entities)
    ]
    return render_codes(Layout(recolored, layout.caption), config)


@dataclass
class KindNegatives:
    """Grounding examples that teach the grounder a shape's *kind* and *color*, not only its place (shapes world).

    A grounder that reads color and position boxes a red blob for "red circle": the cycle reward then pays a painted
    box as much as a drawing. One that reads kind and position boxes a blue circle for "red circle": the reward then
    pays any color. Queries that merely add an absent phrase beside the image's own do not teach either: the added
    phrase is the only one whose color is missing or repeated in the query, so the grounder can spot it without
    looking at any shape. These negatives keep the query's form (one phrase per entity, colors distinct, as at
    reward time) and change what the image shows of one entity, or what is asked of it, half of them each way:

    - **another drawing**: the entity's cells are redrawn as another kind in its box (the filled box, or a circle or
      triangle that fits; [`other_kind_masks`]), and its phrase, asked as before, is answered "not present";
    - **another kind asked**: the image stays, and the entity's phrase in the query becomes its color with another
      kind (`red circle` for a red square), answered "not present".

    A `colors` share of the other examples become color negatives, the same two ways: the entity's cells recolored
    to a color the layout does not name (its phrase asked as before), or its kind asked in such a color (`blue
    square` for a red square); both answered "not present".

    Which examples, which entity and which drawing are fixed by the example's content (as `AbsentPhrases`).

    Args:
        prob (`float`): the share of grounding examples made kind negatives.
        redraw (`bool`, *optional*, defaults to `True`): make "another drawing" (and "another color drawn")
            negatives too; `False` only asks (DJO's loop, whose image is the generator's, not the example's codes).
        colors (`float`, *optional*, defaults to `0.0`): the share of the examples not made kind negatives that
            are made color negatives.
    """

    prob: float
    redraw: bool = True
    colors: float = 0.0

    def __post_init__(self):
        for name in ("prob", "colors"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"KindNegatives.{name} must be in [0, 1], got {getattr(self, name)}")

    def apply(self, key: str, layout: Layout, codes: Sequence[int]) -> tuple[list[int], list[str], Layout] | None:
        """`(codes, query, answer layout)` of the negative made from an example, or `None` to leave it as it is.

        Args:
            key (`str`): fixes the choices (the example's content hash).
            layout (`Layout`): the example's layout.
            codes (`Sequence[int]`): the example's image codes, `grid_size**2` of them.
        """
        grid_size = int(round(len(codes) ** 0.5))
        candidates = [i for i, e in enumerate(layout.entities) if is_shapes_phrase(e.phrase)]
        if grid_size * grid_size != len(codes) or not candidates:
            return None
        rng = random.Random(f"kind|{key}")
        if self.prob and rng.random() < self.prob:
            return self._other_kind(rng, rng.choice(candidates), layout, codes, grid_size)
        colors = random.Random(f"color|{key}")
        if self.colors and colors.random() < self.colors:
            return self._other_color(colors, colors.choice(candidates), layout, codes, grid_size)
        return None

    def _other_kind(self, rng, i: int, layout: Layout, codes, grid_size: int):
        entity = layout.entities[i]
        color, _, kind = " ".join(entity.phrase.lower().split()).partition(" ")
        x1, y1, x2, y2 = _cell_box(entity, grid_size)
        others = (
            other_kind_masks(kind, x2 - x1, y2 - y1) if 0 <= x1 < x2 <= grid_size and 0 <= y1 < y2 <= grid_size else []
        )
        query = list(layout.phrases)
        if others and rng.random() < 0.5 and self.redraw:
            drawn = redraw_entity(codes, entity, rng.choice(others), grid_size)
            return drawn, query, _without(layout, i)
        present = {" ".join(p.lower().split()) for p in query}
        swaps = [f"{color} {k}" for k in SHAPES if k != kind and f"{color} {k}" not in present]
        if not swaps:
            return None
        query[i] = rng.choice(swaps)
        return list(codes), query, layout

    def _other_color(self, rng, i: int, layout: Layout, codes, grid_size: int):
        entity = layout.entities[i]
        color, _, kind = " ".join(entity.phrase.lower().split()).partition(" ")
        named = {" ".join(p.lower().split()).partition(" ")[0] for p in layout.phrases}
        unused = [c for c in COLOR_NAMES if c not in named]
        if not unused:
            return None
        new = rng.choice(unused)
        query = list(layout.phrases)
        x1, y1, x2, y2 = _cell_box(entity, grid_size)
        if rng.random() < 0.5 and self.redraw and 0 <= x1 < x2 <= grid_size and 0 <= y1 < y2 <= grid_size:
            grid = np.asarray(codes, dtype=np.int64).reshape(grid_size, grid_size).copy()
            box = grid[y1:y2, x1:x2]
            box[box == COLOR_NAMES.index(color) + 1] = COLOR_NAMES.index(new) + 1
            return grid.ravel().tolist(), query, _without(layout, i)
        query[i] = f"{new} {kind}"
        return list(codes), query, layout


def _without(layout: Layout, i: int) -> Layout:
    return Layout([e for j, e in enumerate(layout.entities) if j != i], layout.caption)
