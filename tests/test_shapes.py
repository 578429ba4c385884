import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echogen_rl.data.shapes import (
    ShapesConfig,
    build_shapes_dataset,
    codes_to_image,
    detect_from_codes,
    phrase_pool,
    render_codes,
    sample_shapes,
    shape_mask,
)
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.palette import CAPTION_WORDS, COLOR_NAMES, PALETTE, SHAPES

CONFIG = ShapesConfig()
SAMPLES = [sample_shapes(seed) for seed in range(300)]


def _cells(entity, g=CONFIG.grid_size):
    return tuple(round(v * g) for v in entity.box)


def _size(entity):
    x1, y1, x2, y2 = _cells(entity)
    return x2 - x1, y2 - y1


def test_same_seed_same_sample_and_different_seeds_differ():
    a, b = sample_shapes(7), sample_shapes(7)
    assert (a.caption, a.layout, a.codes) == (b.caption, b.layout, b.codes)
    assert a.image.tobytes() == b.image.tobytes()
    assert len({tuple(s.codes) for s in SAMPLES}) > 250


def test_sample_structure():
    g = CONFIG.grid_size
    for s in SAMPLES:
        assert len(s.codes) == g * g and all(0 <= c < len(PALETTE) for c in s.codes)
        assert s.image.mode == "RGB" and s.image.size == (CONFIG.image_size, CONFIG.image_size)
        assert 1 <= len(s.layout) <= CONFIG.max_shapes
        assert s.layout.caption == s.caption
        colors = [e.phrase.split()[0] for e in s.layout.entities]
        assert len(set(colors)) == len(colors)
        for e in s.layout.entities:
            color, kind = e.phrase.split()
            assert color in COLOR_NAMES and kind in SHAPES
            x1, y1, x2, y2 = e.box
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            assert all(v * g == round(v * g) for v in e.box)
            w, h = x2 * g - x1 * g, y2 * g - y1 * g
            lo = max(CONFIG.min_cells, 3) if kind in ("circle", "triangle") else CONFIG.min_cells
            assert lo <= w <= CONFIG.max_cells and lo <= h <= CONFIG.max_cells
            assert (w == h) == (kind in ("square", "circle")) or kind == "triangle"
        words = set(CAPTION_WORDS) | set(COLOR_NAMES) | set(SHAPES)
        assert set(s.caption.split()) <= words
        assert all(e.phrase in s.caption for e in s.layout.entities)


def test_shapes_never_overlap():
    for s in SAMPLES:
        for a, b in itertools.combinations(s.layout.entities, 2):
            (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = _cells(a), _cells(b)
            assert ax2 <= bx1 or bx2 <= ax1 or ay2 <= by1 or by2 <= ay1
        # Every entity's cells survive in the final grid: nothing painted over another shape.
        drawn = sum(int(shape_mask(e.phrase.split()[1], *_size(e)).sum()) for e in s.layout.entities)
        assert drawn == sum(c != 0 for c in s.codes)


def test_all_kinds_and_shape_counts_occur():
    phrases = [e.phrase for s in SAMPLES for e in s.layout.entities]
    assert {p.split()[1] for p in phrases} == set(SHAPES)
    assert {len(s.layout) for s in SAMPLES} == {1, 2, 3}


def test_oracle_recovers_clean_samples_exactly():
    for s in SAMPLES:
        assert detect_from_codes(s.codes).entities == s.layout.entities
        assert detect_from_codes(np.array(s.codes).reshape(8, 8)).entities == s.layout.entities


def test_image_round_trip_through_cell_centers():
    rgb_to_code = {rgb: i for i, rgb in enumerate(PALETTE)}
    p, g = CONFIG.patch_size, CONFIG.grid_size
    for s in SAMPLES[:50]:
        centers = [s.image.getpixel((c * p + p // 2, r * p + p // 2)) for r in range(g) for c in range(g)]
        assert [rgb_to_code[rgb] for rgb in centers] == s.codes
        # Cells are uniform: nearest upsampling, no blending at cell edges.
        assert codes_to_image(s.codes).resize((g, g), resample=0).tobytes() == bytes(
            v for c in s.codes for v in PALETTE[c]
        )


@pytest.mark.parametrize("kind", ["circle", "triangle"])
def test_round_masks_have_exact_bboxes_and_differ_from_other_kinds(kind):
    for w, h in itertools.product(range(1, 9), repeat=2):
        mask = shape_mask(kind, w, h)
        drawable = min(w, h) >= 3 and (kind == "triangle" or w == h)
        assert (mask is not None) == drawable
        if mask is None:
            continue
        assert mask.shape == (h, w)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        for other in SHAPES:
            if other != kind:
                assert not np.array_equal(shape_mask(other, w, h), mask)


def test_triangle_is_isosceles_pointing_up():
    for w, h in itertools.product(range(3, 9), repeat=2):
        widths = shape_mask("triangle", w, h).sum(axis=1)
        assert widths[-1] == w and 1 <= widths[0] < w and np.all(np.diff(widths) >= 0)
        assert np.array_equal(shape_mask("triangle", w, h), shape_mask("triangle", w, h)[:, ::-1])


def test_oracle_classifies_every_kind_and_size():
    g = CONFIG.grid_size
    for kind, w, h in itertools.product(SHAPES, range(1, g + 1), range(1, g + 1)):
        if shape_mask(kind, w, h) is None:
            continue
        layout = Layout([Entity(f"red {kind}", (0.0, 0.0, w / g, h / g))])
        assert detect_from_codes(render_codes(layout)).entities == layout.entities


def test_oracle_blobs_out_of_range_codes_and_components():
    codes = np.zeros((8, 8), dtype=int)
    codes[0, 0] = codes[1, 1] = 1  # diagonal cells are two 4-connected components
    codes[3, 3:6] = 2
    codes[4, 3] = 2  # an L: no kind matches
    codes[7, 7] = 99  # out of the palette: background
    codes[7, 6] = -3
    layout = detect_from_codes(codes)
    assert layout.phrases == ["red square", "red square", "green blob"]
    assert layout.boxes == [(0, 0, 1 / 8, 1 / 8), (1 / 8, 1 / 8, 2 / 8, 2 / 8), (3 / 8, 3 / 8, 6 / 8, 5 / 8)]
    assert codes_to_image(codes).getpixel((31, 31)) == PALETTE[0]
    with pytest.raises(ValueError, match="64 codes"):
        detect_from_codes([1, 2, 3])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40) | st.integers(0, len(PALETTE)), min_size=64, max_size=64))
def test_oracle_never_raises_on_garbage(codes):
    layout = detect_from_codes(codes)
    for e in layout.entities:
        x1, y1, x2, y2 = e.box
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
    assert layout == Layout.from_json(layout.to_json())
    assert codes_to_image(codes).size == (32, 32)


def test_render_codes_rejects_undrawable_entities():
    with pytest.raises(ValueError, match="entity 0"):
        render_codes(Layout([Entity("pink square", (0, 0, 0.25, 0.25))]))
    with pytest.raises(ValueError, match="circle cannot be drawn in a 3x4"):
        render_codes(Layout([Entity("red circle", (0, 0, 3 / 8, 4 / 8))]))
    with pytest.raises(ValueError, match="outside"):
        render_codes(Layout([Entity("red square", (0.5, 0.5, 1.5, 1.5))]))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"grid_size": 0}, "grid_size"),
        ({"patch_size": -1}, "patch_size"),
        ({"min_shapes": 0}, "min_shapes"),
        ({"min_shapes": 3, "max_shapes": 2}, "max_shapes"),
        ({"max_shapes": 9}, "max_shapes"),
        ({"min_cells": 5, "max_cells": 4}, "max_cells"),
        ({"max_cells": 9}, "max_cells"),
        ({"max_cells": 2}, "max_cells"),
        ({"min_cells": 3, "max_cells": 3}, "max_cells"),
        ({"kinds": ("square", "hexagon")}, "kinds"),
        ({"kinds": ()}, "kinds"),
        ({"max_placement_tries": 0}, "max_placement_tries"),
        ({"grid_size": 8.0}, "grid_size"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShapesConfig(**kwargs)


def test_custom_config():
    config = ShapesConfig(grid_size=12, patch_size=2, min_shapes=4, max_shapes=6, max_cells=5, kinds=("circle",))
    for seed in range(30):
        s = sample_shapes(seed, config)
        assert s.image.size == (24, 24) and len(s.codes) == 144
        assert all(p.endswith(" circle") for p in s.layout.phrases)
        assert detect_from_codes(s.codes, config).entities == s.layout.entities
    assert phrase_pool(config) == [f"{c} circle" for c in COLOR_NAMES]
    # A crowded config drops shapes it cannot place rather than looping.
    crowded = ShapesConfig(grid_size=4, min_shapes=8, max_shapes=8, min_cells=4, max_cells=4, kinds=("square",))
    assert len(sample_shapes(0, crowded).layout) == 1


def test_phrase_pool():
    pool = phrase_pool()
    assert len(pool) == len(set(pool)) == len(COLOR_NAMES) * len(SHAPES)
    assert "red circle" in pool and "white triangle" in pool


def test_dataset_columns_rows_and_seeds():
    ds = build_shapes_dataset(20, seed=3)
    assert len(ds) == 20 and ds.column_names == ["caption", "layout", "image", "image_codes"]
    for i, row in enumerate(ds):
        s = sample_shapes(np.random.SeedSequence([3, i]))
        assert Layout.from_json(row["layout"]) == s.layout
        assert row["caption"] == s.caption and row["image_codes"] == s.codes
        assert row["image"].convert("RGB").tobytes() == s.image.tobytes()
    assert build_shapes_dataset(20, seed=3)["image_codes"] == ds["image_codes"]
    assert build_shapes_dataset(5, seed=3)["layout"] == ds["layout"][:5]
    other = build_shapes_dataset(20, seed=4)["image_codes"]
    assert sum(a == b for a, b in zip(other, ds["image_codes"])) < 5
    assert len(build_shapes_dataset(0)) == 0


@pytest.mark.parametrize("seed", range(8))
def test_cyclerl_shapes_prompts_are_drawable_layouts_of_the_world(seed):
    """The shipped shapes CycleRL config takes its prompts from shapes layouts (`prompt_source: dataset`): every
    prompt parses back to a layout the world draws (kinds in boxes they fit, distinct colors, the dataset's caption
    template), and the oracle reads the drawing back as that layout."""
    from echogen_rl.data.random_layouts import add_prompt_column
    from echogen_rl.data.shapes import make_caption
    from echogen_rl.models.prompts import parse_prompt_text

    prompts = add_prompt_column(build_shapes_dataset(256, seed=1000 + seed))
    for text in prompts["prompt"]:
        layout = parse_prompt_text(text)
        colors = [p.split()[0] for p in layout.phrases]
        assert len(set(colors)) == len(colors)
        assert layout.caption == make_caption(layout.phrases)
        assert detect_from_codes(render_codes(layout)).entities == sorted(
            layout.entities, key=lambda e: (e.box[1], e.box[0], e.box[3], e.box[2], e.phrase)
        )
