"""Layouts: entities (phrase + normalized xyxy box), their text format, parsing, validation and geometry.

The text format is PlanGen's, so PlanGen and LayoutSAM data and parsers interoperate::

    <grounding><ref>red square</ref><box>[120, 80, 370, 330]</box>...</grounding>

Coordinates are xyxy normalized to [0, 1] and written as integers `round(1000 * v)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

GROUNDING_START, GROUNDING_END = "<grounding>", "</grounding>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
LAYOUT_TAGS: tuple[str, ...] = (GROUNDING_START, GROUNDING_END, REF_START, REF_END, BOX_START, BOX_END)
COORD_SCALE = 1000


class LayoutError(ValueError):
    """An invalid layout; the message names the entity index, the field and the value at fault."""


@dataclass(frozen=True)
class Entity:
    """One object of a layout.

    Args:
        phrase (`str`): what the object is, e.g. `"red circle"`.
        box (`tuple[float, float, float, float]`): `(x1, y1, x2, y2)` normalized to [0, 1].
    """

    phrase: str
    box: tuple[float, float, float, float]


@dataclass
class Layout:
    """A global caption and its entities, in order.

    Args:
        entities (`list[Entity]`): the objects, in the order they are written and queried.
        caption (`str`, *optional*, defaults to `""`): the global caption.
    """

    entities: list[Entity] = field(default_factory=list)
    caption: str = ""

    @property
    def phrases(self) -> list[str]:
        return [e.phrase for e in self.entities]

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [e.box for e in self.entities]

    def __len__(self) -> int:
        return len(self.entities)

    def to_text(self) -> str:
        """The PlanGen layout text of the entities (the caption is not part of it)."""
        parts = [GROUNDING_START]
        for e in self.entities:
            coords = ", ".join(str(quantize(v)) for v in e.box)
            parts.append(f"{REF_START}{e.phrase}{REF_END}{BOX_START}[{coords}]{BOX_END}")
        parts.append(GROUNDING_END)
        return "".join(parts)

    def to_dict(self) -> dict:
        return {"caption": self.caption, "entities": [{"phrase": e.phrase, "box": list(e.box)} for e in self.entities]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        """Builds a layout from `{"caption": str, "entities": [{"phrase": str, "box": [x1, y1, x2, y2]}]}`."""
        if not isinstance(data, dict):
            raise LayoutError(f"layout must be a JSON object, got {type(data).__name__}")
        raw = data.get("entities", [])
        if not isinstance(raw, list):
            raise LayoutError(f"layout field 'entities' must be a list, got {type(raw).__name__}")
        entities = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "phrase" not in item or "box" not in item:
                raise LayoutError(f"entity {i}: expected an object with 'phrase' and 'box', got {item!r}")
            box = item["box"]
            if not isinstance(box, (list, tuple)) or len(box) != 4:
                raise LayoutError(f"entity {i}: field 'box' must be 4 numbers [x1, y1, x2, y2], got {box!r}")
            try:
                box = tuple(float(v) for v in box)
            except (TypeError, ValueError) as err:
                raise LayoutError(f"entity {i}: field 'box' holds a non-number: {box!r}") from err
            entities.append(Entity(str(item["phrase"]), box))
        caption = data.get("caption", "")
        return cls(entities, caption if isinstance(caption, str) else str(caption))

    @classmethod
    def from_json(cls, text: str) -> Layout:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LayoutError(f"layout is not valid JSON: {err}") from err
        return cls.from_dict(data)


def quantize(v: float) -> int:
    """A normalized coordinate as the integer written in layout text, clamped to [0, 1000]."""
    if not math.isfinite(v):
        raise LayoutError(f"coordinate is not finite: {v!r}")
    return min(COORD_SCALE, max(0, round(COORD_SCALE * v)))
