"""The two task turns in the Janus template, as token ids + image masks + aligned labels.

Janus template (deepseek-ai/Janus): `<|User|>: {user}\\n\\n<|Assistant|>:{assistant}`.

- **L2I** (layout -> image): user = caption + " " + layout text; assistant = `<begin_of_image>` + N codes.
- **I2L** (image -> layout): user = `<begin_of_image>` + N codes + `<end_of_image>` + a grounding query;
  assistant = layout text + EOS.

Labels are already aligned to the position that *predicts* them: `image_labels[t]` is the code at `t + 1`
(or -100), likewise `text_labels[t]`; a loss is `CE(head(hidden[t]), labels[t])` with no further shift.
Text pieces are tokenized separately and joined with special-token ids, so any Janus tokenizer (the tiny
word-level one or Janus-Pro's BPE) gives the same structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from echogen_rl.layout import GROUNDING_START, LAYOUT_TAGS, Layout, grounding_answer
from echogen_rl.layout_text import parse_layout

IGNORE_INDEX = -100
USER_PREFIX = "<|User|>: "
ASSISTANT_PREFIX = "\n\n<|Assistant|>:"
DETECT_ALL_QUERY = "Detect all objects."


def l2i_prompt_text(layout: Layout) -> str:
    """The L2I user text (caption, then layout text): CycleRL's `prompt` column, parsed back by the trainer."""
    return f"{layout.caption or ''} {layout.to_text()}".strip()


def parse_prompt_text(text: str) -> Layout:
    """The Layout (with its caption) of an L2I user text made by `l2i_prompt_text`; a bad one raises naming it."""
    caption = text.split(GROUNDING_START, 1)[0].strip()
    layout, problems = parse_layout(text, caption=caption)
    if problems or not layout.entities:
        raise ValueError(f"prompt {text[:80]!r} is not a caption + layout text: {problems or ['no entities']}")
    return layout


def grounding_query(phrases: Sequence[str]) -> str:
    """The I2L query listing the phrases in order, e.g. `Locate: red square; blue circle`."""
    return "Locate: " + "; ".join(phrases)


@dataclass
class Segment:
    """One task turn as parallel lists (one entry per token).

    Attributes:
        input_ids (`list[int]`): text token ids, or codes where `image_mask` is set.
        image_mask (`list[bool]`): which positions hold image codes.
        text_labels (`list[int]`): the text token predicted at each position, or -100.
        image_labels (`list[int]`): the code predicted at each position, or -100.
        task (`str`): `"l2i"` or `"i2l"`.
    """

    input_ids: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)
    text_labels: list[int] = field(default_factory=list)
    image_labels: list[int] = field(default_factory=list)
    task: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    def add_text(self, ids: Sequence[int], train: bool = False) -> None:
        self._add(ids, is_image=False, train=train)

    def add_image(self, codes: Sequence[int], train: bool = False) -> None:
        self._add(codes, is_image=True, train=train)

    def _add(self, ids: Sequence[int], is_image: bool, train: bool) -> None:
        ids = [int(i) for i in ids]
        if train and self.input_ids:
            # The previous position predicts the first new token; each new token predicts the next one.
            targets = self.image_labels if is_image else self.text_labels
            targets[-1] = ids[0]
        for k, token in enumerate(ids):
            self.input_ids.append(token)
            self.image_mask.append(is_image)
            nxt = ids[k + 1] if train and k + 1 < len(ids) else IGNORE_INDEX
            self.image_labels.append(nxt if is_image else IGNORE_INDEX)
            self.text_labels.append(IGNORE_INDEX if is_image else nxt)


class PromptBuilder:
    """Builds L2I and I2L segments for a Janus tokenizer.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a Janus tokenizer; must know BOS, EOS, PAD,
            `<begin_of_image>` and `<end_of_image>`, and the six layout tags (see `add_layout_tokens`).
        num_image_tokens (`int`): codes per image (64 for the tiny 8x8 model, 576 for Janus-Pro).
    """

    def __init__(self, tokenizer, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.boi_id = _token_id(tokenizer, "<begin_of_image>")
        self.eoi_id = _token_id(tokenizer, "<end_of_image>")
        missing = [t for t in LAYOUT_TAGS if _token_id(tokenizer, t, required=False) is None]
        if missing:
            raise ValueError(
                f"tokenizer lacks the layout tags {missing}; call echogen_rl.models.prompts.add_layout_tokens"
            )
        if None in (self.bos_id, self.eos_id):
            raise ValueError("tokenizer needs a BOS and an EOS token")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _check_codes(self, codes: Sequence[int], where: str) -> list[int]:
        codes = [int(c) for c in codes]
        if len(codes) != self.num_image_tokens:
            raise ValueError(f"{where}: expected {self.num_image_tokens} image codes, got {len(codes)}")
        return codes

    def l2i_prompt(self, layout: Layout) -> Segment:
        """BOS + user turn + `<|Assistant|>:` + `<begin_of_image>`: what image generation starts from."""
        seg = Segment(task="l2i")
        seg.add_text([self.bos_id, *self.encode(f"{USER_PREFIX}{l2i_prompt_text(layout)}{ASSISTANT_PREFIX}")])
        seg.add_text([self.boi_id])
        return seg

    def l2i(self, layout: Layout, codes: Sequence[int]) -> Segment:
        """The L2I turn with its image: labels on every code (predicted from `<begin_of_image>` on)."""
        seg = self.l2i_prompt(layout)
        seg.add_image(self._check_codes(codes, "l2i"), train=True)
        return seg

    def unconditional(self, l2i: Segment) -> Segment:
        """The L2I segment with its prompt blanked as CFG's unconditional row: BOS and `<begin_of_image>` kept,
        every other prompt token padding (what `modeling.uncond_prompt_ids` builds at sampling time)."""
        keep = (self.bos_id, self.boi_id)
        ids = [t if img or t in keep else self.pad_id for t, img in zip(l2i.input_ids, l2i.image_mask)]
        return Segment(ids, list(l2i.image_mask), list(l2i.text_labels), list(l2i.image_labels), l2i.task)

    def i2l_prefix(self, codes: Sequence[int]) -> Segment:
        """BOS + `<|User|>: ` + `<begin_of_image>` codes `<end_of_image>`: the part shared by every query."""
        seg = Segment(task="i2l")
        seg.add_text([self.bos_id, *self.encode(USER_PREFIX), self.boi_id])
        seg.add_image(self._check_codes(codes, "i2l"))
        seg.add_text([self.eoi_id])
        return seg

    def i2l_query_ids(self, phrases: Sequence[str] | None) -> list[int]:
        """The query and `<|Assistant|>:` after the image; `phrases=None` asks to detect all objects."""
        query = DETECT_ALL_QUERY if phrases is None else grounding_query(phrases)
        return self.encode(f"{query}{ASSISTANT_PREFIX}")

    def i2l(
        self,
        codes: Sequence[int],
        layout: Layout | None = None,
        detect_all: bool = False,
        query: Sequence[str] | None = None,
    ) -> Segment:
        """The I2L turn; with `layout`, its answer (layout text + EOS) carries the text labels.

        Args:
            codes (`Sequence[int]`): the image codes.
            layout (`Layout`, *optional*): the answer; its phrases make the query.
            detect_all (`bool`, *optional*, defaults to `False`): use the free "detect all objects" query.
            query (`Sequence[str]`, *optional*): the phrases to ask for instead of the layout's, in order; a
                phrase the layout lacks is answered "not present" (see `layout.grounding_answer`).
        """
        if detect_all and query is not None:
            raise ValueError("i2l: pass a query or detect_all, not both")
        seg = self.i2l_prefix(codes)
        if query is None and not detect_all and layout is not None:
            query = layout.phrases
        seg.add_text(self.i2l_query_ids(query))
        if layout is not None:
            answer = layout.to_text() if query is None else grounding_answer(query, layout)
            seg.add_text([*self.encode(answer), self.eos_id], train=True)
        return seg


def _token_id(tokenizer, token: str, required: bool = True) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        if required:
            raise ValueError(f"tokenizer has no token {token!r}")
        return None
    return tid


def add_layout_tokens(tokenizer, model=None) -> int:
    """Adds the six layout tags to a tokenizer that lacks them (e.g. Janus-Pro's), and resizes the model.

    Returns:
        `int`: how many tokens were added.
    """
    missing = [t for t in LAYOUT_TAGS if _token_id(tokenizer, t, required=False) is None]
    added = tokenizer.add_tokens(missing) if missing else 0
    # Grow only: a checkpoint may have more embedding rows than its tokenizer has tokens (Janus-Pro does).
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return added


def pad_segments(segments: Sequence[Segment], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stacks segments into a padded batch: `input_ids`, `image_mask`, `attention_mask`, both label tensors."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max((len(s) for s in segments), default=0)
    fills = {"input_ids": pad_id, "image_mask": False, "text_labels": IGNORE_INDEX, "image_labels": IGNORE_INDEX}
    batch = {k: [] for k in fills}
    batch["attention_mask"] = []
    for seg in segments:
        n = width - len(seg)
        for key, fill in fills.items():
            row = getattr(seg, key)
            batch[key].append(([fill] * n + row) if padding_side == "left" else (row + [fill] * n))
        ones = [1] * len(seg)
        batch["attention_mask"].append(([0] * n + ones) if padding_side == "left" else (ones + [0] * n))
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    out["image_mask"] = out["image_mask"].bool()
    return out
