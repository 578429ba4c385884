"""The shapes world's vocabulary: colors, shape kinds and the palette that the palette tokenizer codes.

Kept apart from the generator so that the tokenizer, the tiny checkpoint's word list and the data all
read one definition.
"""

# Code 0 is the background; code i (i >= 1) is COLORS[i - 1]. Colors are far apart in RGB so that a
# nearest-palette lookup is exact on rendered images and robust to mild noise.
BACKGROUND_RGB = (0, 0, 0)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 230, 30),
    "purple": (150, 40, 200),
    "cyan": (30, 220, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
PALETTE: list[tuple[int, int, int]] = [BACKGROUND_RGB, *COLORS.values()]
COLOR_NAMES: list[str] = list(COLORS)
SHAPES: tuple[str, ...] = ("square", "rectangle", "circle", "triangle")

# Every word a shapes caption, phrase or query may use; the tiny checkpoint's tokenizer is built from it.
CAPTION_WORDS: tuple[str, ...] = (
    "a", "an", "and", "image", "of", "with", "on", "the", "black", "background", "picture", "shows",
    "left", "right", "top", "bottom", "above", "below", "next", "to", "one", "two", "three", "four",
    "five", "six", "shapes", "shape", "locate", "detect", "all", "objects", "in", "this",
)  # fmt: skip
