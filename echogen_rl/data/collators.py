"""Collators: PMTP's packing collator (and, with DJO, the loop-loss collator).

Each example carries `caption`, `layout` (JSON text) and `image_codes`; the collators build the token
rows themselves, so the trainers skip TRL's dataset preparation.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from echogen_rl.data.kind_negatives import KindNegatives
from echogen_rl.layout import Layout, LayoutError
from echogen_rl.models.prompts import IGNORE_INDEX, PromptBuilder, Segment, pad_segments

_KEYS = ("input_ids", "image_mask", "text_labels", "image_labels")


def _unit_hash(example: dict) -> float:
    """A number in [0, 1) fixed by the example's content."""
    key = f"{example.get('caption', '')}|{example.get('layout', '')}|{list(example['image_codes'])}"
    return zlib.crc32(key.encode()) / 2**32


def training_columns(dataset):
    """The dataset with the columns the collators read (`caption`, `layout`, `image_codes`) checked.

    An `image` column is dropped: training reads only the codes, and TRL would take the data for a VLM dataset.
    """
    if isinstance(dataset, dict):
        return {k: training_columns(v) for k, v in dataset.items()}
    missing = {"caption", "layout", "image_codes"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"dataset lacks the columns {sorted(missing)} (need caption, layout, image_codes)")
    return dataset.remove_columns([c for c in ("image", "images") if c in dataset.column_names])


def dataset_phrases(dataset, limit: int = 100_000) -> tuple[str, ...]:
    """The distinct entity phrases of a dataset's `layout` column (its first `limit` rows), in first-seen order:
    the pool [`AbsentPhrases`] draws from."""
    seen: dict[str, None] = {}
    for text in dataset.select_columns(["layout"]).select(range(min(limit, len(dataset))))["layout"]:
        try:
            seen.update(dict.fromkeys(Layout.from_json(text).phrases))
        except LayoutError:
            continue  # the collator names a bad layout when it meets it
    return tuple(seen)


def shuffled_query(example: dict, query: Sequence[str]) -> list[str]:
    """The query's phrases in an order fixed by the example's content, not drawn (a resumed run sees the same).

    Asked in the layout's own order, a grounder can answer phrase i with the i-th shape in reading order without
    reading any word of it; a cycle reward read by such a grounder pays a shape of any color (and often any kind).
    Shuffled, each phrase must be matched to its shape by what it says."""
    phrases = list(query)
    random.Random(zlib.crc32(f"order|{_unit_hash(example)}".encode())).shuffle(phrases)
    return phrases


@dataclass
class AbsentPhrases:
    """Adds a phrase the image does not hold to some I2L queries, answered "not present" (`<box>[]</box>`).

    So that the grounder refuses what is not there: without such queries it learns that every asked phrase has a
    box, and boxes the only red thing in an image for "red circle" even when it is a red blob. Half of the added
    phrases share a word (articles aside) with a phrase of the image, in the shapes world another kind of the same
    color or the same kind in another color: the hard negatives that teach the grounder to read both words. Which examples, which phrase and where
    in the query are fixed by the example's content, not drawn (as for `uncond_prob`: a resumed run sees the same).

    Args:
        prob (`float`): the share of I2L queries that get one absent phrase.
        pool (`Sequence[str]`): the phrases to draw from (e.g. [`dataset_phrases`]).
    """

    prob: float
    pool: Sequence[str]

    def __post_init__(self):
        if not 0 <= self.prob <= 1:
            raise ValueError(f"AbsentPhrases.prob must be in [0, 1], got {self.prob}")
        if self.prob > 0 and not self.pool:
            raise ValueError("AbsentPhrases: the phrase pool is empty")
        self.pool = tuple(dict.fromkeys(self.pool))

    def query(self, example: dict, layout: Layout) -> list[str] | None:
        """The example's I2L query with an absent phrase inserted, or `None` to ask for the layout's phrases."""
        rng = random.Random(zlib.crc32(f"absent|{_unit_hash(example)}".encode()))
        if self.prob == 0 or rng.random() >= self.prob:
            return None
        present = {_norm(p) for p in layout.phrases}
        candidates = [p for p in self.pool if _norm(p) not in present]
        if not candidates:
            return None
        words = {w for p in present for w in p.split()} - _ARTICLES
        hard = [p for p in candidates if words & set(_norm(p).split())]
        phrase = rng.choice(hard if hard and rng.random() < 0.5 else candidates)
        query = list(layout.phrases)
        query.insert(rng.randrange(len(query) + 1), phrase)
        return query


_ARTICLES = {"a", "an", "the"}


def _norm(phrase: str) -> str:
    return " ".join(phrase.lower().split())


def example_layout(example: dict, index: int) -> Layout:
    """The example's Layout with its caption; a bad one raises a ValueError naming the example."""
    try:
        layout = Layout.from_json(example["layout"])
        layout.validate()
    except (KeyError, LayoutError) as err:
        raise ValueError(f"example {index} ({example.get('caption', '')[:60]!r}): bad layout: {err}") from err
    layout.caption = example.get("caption", layout.caption) or ""
    return layout


@dataclass
class PMTPCollator:
    """Packs `[L2I segment | I2L segment]` per sample, several samples per row up to `max_length`.

    Every segment is its own causal block: the trainer turns `segment_ids` into a block-diagonal mask,
    and `position_ids` restart at 0 per segment. An I2L answer must not read the L2I image positions,
    which attend to the layout prompt: a grounder that copies the layout fails on real images.

    Args:
        prompts (`PromptBuilder`): builds the two segments.
        max_length (`int`, *optional*): tokens per row; a sample longer than this is an error naming it.
            `None` puts the whole batch in one row.
        pack (`bool`, *optional*, defaults to `True`): `False` puts every segment in a row of its own
            (the unpacked reference; same losses, more padding).
        uncond_prob (`float`, *optional*, defaults to `0.0`): the share of samples whose L2I prompt is blanked
            to the unconditional CFG row (BOS and `<begin_of_image>` kept, the rest padding), so that the model
            learns the unconditional branch classifier-free guidance subtracts (Janus trains so). Which samples
            is a hash of their content, not a draw: a draw in the collator would also happen for the batches a
            resumed run skips, and the resumed run would diverge.
        tasks (`tuple[str, ...]`, *optional*, defaults to `("l2i", "i2l")`): the segments to build; one task
            alone trains a single-task model (the demo's "separate" baseline) without paying for the other.
        absent (`AbsentPhrases`, *optional*): adds phrases the image does not hold to some I2L queries.
        kinds (`KindNegatives`, *optional*): makes some I2L examples negatives of one entity's kind (shapes world):
            another drawing in its box, or another kind asked, answered "not present". An example made one gets no
            absent phrase.
        shuffle_queries (`bool`, *optional*, defaults to `False`): ask each I2L query's phrases in an order fixed by
            the example's content ([`shuffled_query`]) instead of the layout's, so that the grounder matches phrases
            to shapes by their words, not by reading order.

    Returns a dict of [R, L] tensors: `input_ids`, `image_mask`, `text_labels`, `image_labels`,
    `segment_ids` (-1 on padding), `position_ids`.
    """

    prompts: PromptBuilder
    max_length: int | None = None
    pack: bool = True
    uncond_prob: float = 0.0
    tasks: tuple[str, ...] = ("l2i", "i2l")
    absent: AbsentPhrases | None = None
    kinds: KindNegatives | None = None
    shuffle_queries: bool = False

    def __post_init__(self):
        if not self.tasks or set(self.tasks) - {"l2i", "i2l"}:
            raise ValueError(f"PMTPCollator.tasks must be a non-empty subset of ('l2i', 'i2l'), got {self.tasks}")

    def segments(self, example: dict, index: int) -> list[Segment]:
        layout = example_layout(example, index)
        codes = example["image_codes"]
        try:
            out = []
            if "l2i" in self.tasks:
                l2i = self.prompts.l2i(layout, codes)
                if self.uncond_prob > 0 and _unit_hash(example) < self.uncond_prob:
                    l2i = self.prompts.unconditional(l2i)
                out.append(l2i)
            if "i2l" in self.tasks:
                negative = self.kinds.apply(str(_unit_hash(example)), layout, codes) if self.kinds else None
                shown, answer = codes, layout
                if negative is not None:
                    shown, query, answer = negative
                else:
                    query = self.absent.query(example, layout) if self.absent else None
                if self.shuffle_queries:
                    query = shuffled_query(example, layout.phrases if query is None else query)
                out.append(self.prompts.i2l(shown, answer, query=query))
            return out
        except ValueError as err:
            raise ValueError(f"example {index} ({layout.caption[:60]!r}): {err}") from err

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        pairs = []
        for index, example in enumerate(examples):
            pair = self.segments(example, index)
            size = sum(len(s) for s in pair)
            if self.max_length is not None and size > self.max_length:
                raise ValueError(
                    f"example {index} ({example.get('caption', '')[:60]!r}) needs {size} tokens, more than "
                    f"max_length={self.max_length}; raise max_length or cap the entities per layout"
                )
            pairs.append((size, pair))
        if not self.pack:
            return pack_rows([[s] for _, pair in pairs for s in pair], self.prompts.pad_id)
        # First-fit decreasing: the longest samples first, each into the first row with room.
        rows: list[list[Segment]] = []
        room: list[int] = []
        for size, pair in sorted(pairs, key=lambda p: -p[0]):
            for r, free in enumerate(room):
                if self.max_length is None or size <= free:
                    rows[r].extend(pair)
                    room[r] = free - size if self.max_length is not None else 0
                    break
            else:
                rows.append(list(pair))
                room.append(self.max_length - size if self.max_length is not None else 0)
        return pack_rows(rows, self.prompts.pad_id)


def pack_rows(rows: Sequence[Sequence[Segment]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenates the segments of each row, right-pads rows to one length, numbers segments and positions."""
    width = max(sum(len(s) for s in row) for row in rows)
    fills = {"input_ids": pad_id, "image_mask": False, "text_labels": IGNORE_INDEX, "image_labels": IGNORE_INDEX}
    out = {k: [] for k in (*_KEYS, "segment_ids", "position_ids")}
    for row in rows:
        cols = {k: [] for k in out}
        for k, seg in enumerate(row):
            for key in _KEYS:
                cols[key] += getattr(seg, key)
            cols["segment_ids"] += [k] * len(seg)
            cols["position_ids"] += list(range(len(seg)))
        n = width - len(cols["input_ids"])
        for key, fill in {**fills, "segment_ids": -1, "position_ids": 0}.items():
            out[key].append(cols[key] + [fill] * n)
    batch = {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
    batch["image_mask"] = batch["image_mask"].bool()
    return batch


@dataclass
class LoopLossCollator:
    """DJO's batch: each sample's L2I sequence and its I2L sequence, as two right-padded batches.

    The L2I rows are teacher-forced (image labels on all N codes). The I2L rows ask for the sample's layout
    and carry its answer as text labels; their image positions hold the true codes, which the DJO loss replaces
    with the soft tokens read from the L2I logits. Both batches list samples in the same order, so the image
    positions of one match the image labels of the other in row-major order.

    Args:
        prompts (`PromptBuilder`): builds the two sequences.
        max_length (`int`, *optional*): most tokens per sequence; a longer one is an error naming its sample
            (truncating would cut image codes). `None`: no limit.
        absent (`AbsentPhrases`, *optional*): adds phrases the image does not hold to some I2L queries, so that
            the loop loss also asks the generated image what it must not show.
        kinds (`KindNegatives`, *optional*): asks some I2L queries for one entity's color with another kind,
            answered "not present" (the generated image must not show a red circle where the layout has a red
            square); only the query changes (`redraw=False`): the loop's image is the generator's.
        shuffle_queries (`bool`, *optional*, defaults to `False`): ask each I2L query's phrases in an order fixed by
            the example's content ([`shuffled_query`]), as [`PMTPCollator`] does.

    Returns a dict of right-padded tensors: `input_ids`, `image_mask`, `attention_mask`, `text_labels` and
    `image_labels` of each batch, prefixed `l2i_` and `i2l_`.
    """

    prompts: PromptBuilder
    max_length: int | None = None
    absent: AbsentPhrases | None = None
    kinds: KindNegatives | None = None
    shuffle_queries: bool = False

    def __post_init__(self):
        if self.kinds is not None and self.kinds.redraw:
            raise ValueError(
                "LoopLossCollator: kind negatives may only change the query (KindNegatives(redraw=False))"
            )

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        l2i, i2l = [], []
        for index, example in enumerate(examples):
            layout = example_layout(example, index)
            codes = example.get("image_codes")
            if codes is None:
                raise ValueError(f"example {index} ({layout.caption[:60]!r}): no image_codes")
            try:
                negative = self.kinds.apply(str(_unit_hash(example)), layout, codes) if self.kinds else None
                if negative is not None:
                    query = negative[1]
                else:
                    query = self.absent.query(example, layout) if self.absent else None
                if self.shuffle_queries:
                    query = shuffled_query(example, layout.phrases if query is None else query)
                pair = self.prompts.l2i(layout, codes), self.prompts.i2l(codes, layout, query=query)
            except ValueError as err:
                raise ValueError(f"example {index} ({layout.caption[:60]!r}): {err}") from err
            size = max(len(s) for s in pair)
            if self.max_length is not None and size > self.max_length:
                raise ValueError(
                    f"example {index} ({layout.caption[:60]!r}) needs {size} tokens in one sequence, more than "
                    f"max_length={self.max_length}; raise max_length or cap the entities per layout"
                )
            l2i.append(pair[0])
            i2l.append(pair[1])
        batch = {f"l2i_{k}": v for k, v in pad_segments(l2i, self.prompts.pad_id, "right").items()}
        batch.update({f"i2l_{k}": v for k, v in pad_segments(i2l, self.prompts.pad_id, "right").items()})
        return batch
