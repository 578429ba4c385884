"""Reading layout text back: a tolerant parser of PlanGen layout text (see [`echogen_rl.layout`] for the format),
which recovers every valid entity and names every problem."""

from __future__ import annotations

import re

from echogen_rl.layout import (
    ABSENT_BOX,
    BOX_END,
    BOX_START,
    COORD_SCALE,
    GROUNDING_END,
    GROUNDING_START,
    REF_END,
    REF_START,
    Box,
    Entity,
    Layout,
    LayoutError,
    _check_entity,
)

# Whitespace is allowed inside tags because word-level tokenizers decode `<ref>` as `< ref >` or ` <ref> `. No two
# whitespace runs are adjacent (the second needs the `/`): `<\s*/?\s*` would split a long run of spaces in every
# possible way, which is quadratic.
_TAG_RE = re.compile(r"<\s*(?:(/)\s*)?(grounding|ref|box)\s*>", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _clip(text: str, limit: int = 40) -> str:
    """Keeps problem messages short when the model emits pages of garbage."""
    return text if len(text) <= limit else text[:limit] + "..."


def _tokenize(text: str) -> list[tuple[str, str]]:
    """Splits text into `(tag, raw)` pairs: `tag` is the canonical tag (e.g. `"</ref>"`), or `""` for plain text."""
    tokens, pos = [], 0
    for m in _TAG_RE.finditer(text):
        if m.start() > pos:
            tokens.append(("", text[pos : m.start()]))
        tokens.append((f"<{m[1] or ''}{m[2].lower()}>", m[0]))
        pos = m.end()
    if pos < len(text):
        tokens.append(("", text[pos:]))
    return tokens


def _read_until(tokens: list[tuple[str, str]], i: int, end_tag: str) -> tuple[str, int, bool]:
    """The text at `tokens[i]` up to `end_tag`: `(content, next index, whether end_tag was there)`."""
    content = ""
    if i < len(tokens) and tokens[i][0] == "":
        content, i = tokens[i][1], i + 1
    if i < len(tokens) and tokens[i][0] == end_tag:
        return content, i + 1, True
    return content, i, False


def _parse_box(content: str) -> Box:
    """`"[100, 200, 500, 600]"` as normalized floats; raises `LayoutError` on anything else."""
    body = content.strip()
    # The brackets are required: without the `]` the text may be truncated mid-number, and a box is never guessed.
    if not (body.startswith("[") and body.endswith("]")):
        raise LayoutError(f"field 'box' is not wrapped in [ ]: {_clip(body)!r}")
    parts = [p.strip() for p in body[1:-1].split(",")] if body[1:-1].strip() else []
    bad = next((p for p in parts if not _NUMBER_RE.fullmatch(p)), None)
    if bad is not None:
        raise LayoutError(f"field 'box' holds a non-number: {_clip(bad)!r}")
    if len(parts) != 4:
        raise LayoutError(f"field 'box' has {len(parts)} numbers, expected 4")
    x1, y1, x2, y2 = (float(p) / COORD_SCALE for p in parts)
    return x1, y1, x2, y2


def _take_box(
    content: str,
    ok: bool,
    phrase: str | None,
    index: int,
    entities: list[Entity],
    absent: list[str],
    problems: list[str],
) -> None:
    """Records the `<box>` of entity `index`: its `content` (read up to `</box>`, `ok` if that tag was there) and the
    entity's phrase (`None` without a `<ref>`) give an entity, an absent phrase or a problem."""
    if not ok:
        problems.append(f"entity {index}: missing {BOX_END}")
    if phrase is None:
        problems.append(f"entity {index}: {BOX_START} without {REF_START}")
    elif "".join(content.split()) == ABSENT_BOX:
        if phrase:
            absent.append(phrase)
        else:
            problems.append(f"entity {index}: field 'phrase' is empty: ''")
    else:
        try:
            box = _parse_box(content)
            _check_entity(phrase, box)
            entities.append(Entity(phrase, box))
        except LayoutError as err:
            problems.append(f"entity {index}: {err}")


def parse_layout(text: str, caption: str = "") -> tuple[Layout, list[str]]:
    """Parses PlanGen layout text tolerantly: recovers every valid entity and reports what is wrong; never raises.

    Whitespace anywhere between and inside tags and numbers is accepted, and phrases come back whitespace-normalized.
    Text before the first tag (e.g. a caption PlanGen writes before `<grounding>`) is skipped without a problem. Every
    other departure from the format is a problem: a missing `<grounding>` or closing tag (the entity is still kept
    when it is complete), a `<ref>` without `<box>` or the reverse, a box that is not `[x1, y1, x2, y2]` with numbers
    in [0, 1000] and `x1 < x2`, `y1 < y2` (the entity is dropped, never repaired), text after `</grounding>`, and
    text without any tag. Entity indices in problems count every `<ref>`/`<box>` group of the text from 0, kept or
    not, so they point at the right place. An empty box `[]` is the answer "not present": its phrase goes to the
    layout's `absent` list, and is no problem.

    Args:
        text (`str`): the layout text, e.g. `"<grounding><ref>cat</ref><box>[100, 200, 500, 600]</box></grounding>"`.
        caption (`str`, *optional*, defaults to `""`): the caption of the returned layout.

    Returns:
        `tuple[Layout, list[str]]`: the layout of the valid entities, in order, and the human-readable problems (empty
        when the text is well formed).
    """
    caption = caption if isinstance(caption, str) else ""
    if not isinstance(text, str):
        return Layout([], caption), [f"layout text must be a str, got {type(text).__name__}"]
    tokens = _tokenize(text)
    if not any(tag for tag, _ in tokens):
        return Layout([], caption), ["no layout tags found"]
    entities: list[Entity] = []
    absent: list[str] = []
    problems: list[str] = []
    phrase: str | None = None  # the phrase of the current entity, until its box arrives
    index = 0
    opened = closed = False
    i = 1 if tokens[0][0] == "" else 0  # skip the leading caption
    while i < len(tokens):
        tag, raw = tokens[i]
        i += 1
        if tag in (REF_START, BOX_START, GROUNDING_END) and not opened:
            problems.append(f"missing {GROUNDING_START}")
            opened = True
        if tag == "":
            if raw.strip():
                problems.append(f"unexpected text {_clip(raw.strip())!r}")
        elif tag == GROUNDING_START:
            if opened:
                problems.append(f"unexpected {GROUNDING_START}")
            opened = True
        elif tag == GROUNDING_END:
            closed = True
            rest = "".join(raw for _, raw in tokens[i:]).strip()
            if rest:
                problems.append(f"unparsed trailing text {_clip(rest)!r}")
            break
        elif tag == REF_START:
            if phrase is not None:
                problems.append(f"entity {index}: {REF_START} without {BOX_START}")
                index += 1
            content, i, ok = _read_until(tokens, i, REF_END)
            if not ok:
                problems.append(f"entity {index}: missing {REF_END}")
            phrase = " ".join(content.split())
        elif tag == BOX_START:
            content, i, ok = _read_until(tokens, i, BOX_END)
            _take_box(content, ok, phrase, index, entities, absent, problems)
            phrase = None
            index += 1
        else:
            problems.append(f"unexpected {tag}")
    if phrase is not None:
        problems.append(f"entity {index}: {REF_START} without {BOX_START}")
    if not closed:
        problems.append(f"missing {GROUNDING_END}")
    return Layout(entities, caption, absent), problems
