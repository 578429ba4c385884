import numpy as np
import pytest
from PIL import Image

from echogen_rl.eval.visualize import RECOVERED_COLOR, TARGET_COLOR, image_grid, overlay, save_png
from echogen_rl.layout import Entity, Layout


def test_overlay_draws_both_layouts_at_their_boxes():
    image = Image.new("RGB", (32, 32))
    target = Layout([Entity("red square", (0.25, 0.25, 0.5, 0.5))])
    recovered = Layout([Entity("red square", (0.5, 0.5, 0.75, 0.75))])
    a = np.asarray(overlay(image, target, recovered, size=100))
    assert a.shape == (100, 100, 3)
    assert tuple(a[37, 25]) == TARGET_COLOR  # left edge of the target box
    assert tuple(a[62, 50]) == RECOVERED_COLOR  # left edge of the recovered box
    assert tuple(a[90, 10]) == (0, 0, 0)  # untouched background


def test_grid_layout_and_errors(tmp_path):
    tiles = [Image.new("RGB", (20, 20), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(tiles, columns=2, pad=2)
    assert grid.size == (2 * 22 + 2, 3 * 22 + 2)
    with pytest.raises(ValueError, match="no images"):
        image_grid([])
    path = save_png(grid, tmp_path / "sub" / "grid.png")
    assert Image.open(path).size == grid.size
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left


def test_study_difference_plot_greys_out_comparisons_that_are_no_evidence(tmp_path):
    import numpy as np
    from PIL import Image

    from echogen_rl.experiments.study_report import plot_differences

    cell = {"diff": 0.05, "ci_low": 0.02, "ci_high": 0.08}  # an interval above 0: drawn green when it counts
    green = np.array([44, 160, 44])

    def green_pixels(evidence: bool) -> int:
        summary = {"comparisons": {"cyclerl_vs_sft_continued": {"evidence": evidence, "cycle_miou_ref": cell}}}
        path = plot_differences(summary, tmp_path / f"{evidence}.png", metrics=("cycle_miou_ref",))
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int((np.abs(pixels - green).sum(axis=-1) == 0).sum())

    assert green_pixels(True) > 10
    assert green_pixels(False) == 0
