"""The in-model grounder: image codes + phrases -> Layouts, by batched greedy decoding with a KV cache.

Query strategy: one query per image listing all its phrases in order (`Locate: a; b; c`), the format
PMTP and DJO train. One query per phrase would decode fewer steps per row but asks a question the
model was never trained on, and it would lose the context of the other objects; the prefix
(BOS .. `<end_of_image>`) is prefilled once per image either way.

Malformed output never raises: an entity the model did not give (or gave unreadably) is missing from
the Layout and named in `problems`; `malformed` says whether the text itself failed to parse (a cut box, a missing
tag, no end), as against a well-formed answer that misnames or leaves out a phrase.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from echogen_rl.layout import Entity, Layout
from echogen_rl.layout_text import parse_layout
from echogen_rl.models.decoding import decode_step, prefill
from echogen_rl.models.modeling import embed_mixed, position_ids_from_mask, unwrap_janus
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.models.sharding import gathered_root

DETECT_ALL_MAX_NEW_TOKENS = 256
_PLACEHOLDER_BOX = (0.111, 0.222, 0.333, 0.444)


@dataclass
class GroundingResult:
    """The grounder's answer for one image.

    Attributes:
        layout (`Layout`): the recovered entities, in query order (only those found).
        problems (`list[str]`): what was missing or malformed; empty for a clean answer.
        text (`str`): the decoded answer.
        malformed (`bool`): the text did not parse cleanly or did not end within its budget (some of `problems`
            come from the text itself, not from matching its phrases to the query).
    """

    layout: Layout
    problems: list[str] = field(default_factory=list)
    text: str = ""
    malformed: bool = False


def read_answer(text: str, query: Sequence[str] | None, finished: bool, budget: int) -> GroundingResult:
    """The grounder's decoded answer as a result: parsed, matched to `query` (see [`restrict_to_phrases`]).

    Args:
        text (`str`): the decoded answer.
        query (`Sequence[str]`, *optional*): the phrases asked; `None` for the free "detect all objects" query.
        finished (`bool`): whether the answer ended (end of sequence) within `budget` tokens.
        budget (`int`): the token budget the answer had, named in the problem when it did not end.
    """
    layout, problems = parse_layout(text)
    if not finished:
        problems.append(f"no end of answer within {budget} tokens")
    malformed = bool(problems)
    if query is not None:
        layout, missing = restrict_to_phrases(layout, query)
        problems += missing
    return GroundingResult(layout, problems, text, malformed)


def restrict_to_phrases(layout: Layout, phrases: Sequence[str]) -> tuple[Layout, list[str]]:
    """The answer's entities for the queried phrases, in query order.

    A phrase the answer calls "not present" (`<box>[]</box>`, in `layout.absent`) is a clean answer: it gets no
    box, no problem, and is listed in the result's `absent`. The other phrases are matched to the answer's boxes:
    with as many boxes as such phrases, the k-th box answers the k-th phrase (a grounder still learning names can
    misname a box it placed right). Otherwise a box is matched by phrase (k-th occurrence to k-th), then by
    position among the leftovers. A misnamed or missing entity is reported; a missing one is not guessed.
    """
    norm = [" ".join(p.lower().split()) for p in phrases]
    absent_at: set[int] = set()
    for said in layout.absent:
        key = " ".join(said.lower().split())
        i = next((i for i, p in enumerate(norm) if p == key and i not in absent_at), None)
        if i is not None:
            absent_at.add(i)
    asked = [i for i in range(len(phrases)) if i not in absent_at]
    answer = [" ".join(e.phrase.lower().split()) for e in layout.entities]
    taken, assigned = set(), {i: None for i in asked}
    for k, i in enumerate(asked):
        if len(answer) == len(asked):
            j = k
        else:
            j = next((j for j, a in enumerate(answer) if a == norm[i] and j not in taken), None)
        if j is not None:
            taken.add(j)
            assigned[i] = j
    leftovers = [j for j in range(len(answer)) if j not in taken]
    problems = []
    for i in asked:
        if assigned[i] is not None and answer[assigned[i]] != norm[i]:
            problems.append(
                f"phrase {i} ({phrases[i]!r}): the answer named it {layout.entities[assigned[i]].phrase!r}"
            )
        elif assigned[i] is None and leftovers:
            assigned[i] = leftovers.pop(0)
            problems.append(
                f"phrase {i} ({phrases[i]!r}): the answer named it {layout.entities[assigned[i]].phrase!r}"
            )
        elif assigned[i] is None:
            problems.append(f"phrase {i} ({phrases[i]!r}): no box in the answer")
    if leftovers:
        problems.append(f"{len(leftovers)} entities in the answer were not asked for")
    kept = [Entity(phrases[i], layout.entities[j].box) for i, j in assigned.items() if j is not None]
    return Layout(kept, layout.caption, [phrases[i] for i in sorted(absent_at)]), problems


class Grounder:
    """Batched greedy I2L decoding.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration`, possibly wrapped (PEFT, DDP).
        prompts (`PromptBuilder`): builds the I2L turns for the model's tokenizer.
        batch_size (`int`, *optional*, defaults to `32`): images decoded together.
    """

    def __init__(self, model: torch.nn.Module, prompts: PromptBuilder, batch_size: int = 32):
        self.model = model
        self.prompts = prompts
        self.batch_size = batch_size

    def answer_budget(self, phrases: Sequence[str] | None) -> int:
        """Tokens a full answer for `phrases` takes with this tokenizer, plus slack; a bound for decoding."""
        if phrases is None:
            return DETECT_ALL_MAX_NEW_TOKENS
        text = Layout([Entity(p, _PLACEHOLDER_BOX) for p in phrases]).to_text()
        return len(self.prompts.encode(text)) + 8

    @torch.no_grad()
    def __call__(
        self,
        image_codes: torch.Tensor | Sequence[Sequence[int]],
        phrases: Sequence[Sequence[str]] | None = None,
        max_new_tokens: int | None = None,
    ) -> list[GroundingResult]:
        """Grounds each image.

        Args:
            image_codes (`torch.Tensor` of shape `[B, N]`): the images as codes.
            phrases (`Sequence[Sequence[str]]`, *optional*): the phrases to locate in each image; `None`
                asks the free "detect all objects" query.
            max_new_tokens (`int`, *optional*): decoding bound; by default what a full answer takes.
        """
        codes = torch.as_tensor(image_codes, dtype=torch.long).cpu()
        if phrases is not None and len(phrases) != len(codes):
            raise ValueError(f"ground: {len(codes)} images but {len(phrases)} phrase lists")
        results = []
        with gathered_root(self.model):
            for start in range(0, len(codes), self.batch_size):
                chunk = codes[start : start + self.batch_size]
                chunk_phrases = None if phrases is None else phrases[start : start + self.batch_size]
                results.extend(self._ground_batch(chunk, chunk_phrases, max_new_tokens))
        return results

    def _ground_batch(self, codes, phrases, max_new_tokens) -> list[GroundingResult]:
        janus = unwrap_janus(self.model)
        device = janus.lm_head.weight.device
        queries = [None] * len(codes) if phrases is None else list(phrases)
        segments = []
        for row, query in zip(codes.tolist(), queries):
            seg = self.prompts.i2l_prefix(row)
            seg.add_text(self.prompts.i2l_query_ids(query))
            segments.append(seg)
        batch = {k: v.to(device) for k, v in pad_segments(segments, self.prompts.pad_id, "left").items()}
        # Each row stops at its own bound, so a result does not depend on what it was batched with.
        budgets = [max_new_tokens or self.answer_budget(q) for q in queries]
        limit = torch.tensor(budgets, device=device)
        budget = max(budgets)

        mask = batch["attention_mask"]
        positions = position_ids_from_mask(mask)
        embeds = embed_mixed(janus, batch["input_ids"], batch["image_mask"])
        hidden, cache = prefill(janus, embeds, mask, positions)
        hidden = hidden[:, -1]
        positions = positions[:, -1:] + 1
        eos, pad = self.prompts.eos_id, self.prompts.pad_id
        out = torch.full((len(codes), budget), pad, dtype=torch.long, device=device)
        done = torch.zeros(len(codes), dtype=torch.bool, device=device)
        for i in range(budget):
            token = janus.lm_head(hidden).argmax(-1).masked_fill(done, pad)
            out[:, i] = token
            done |= (token == eos) | (limit <= i + 1)
            if bool(done.all()) or i + 1 == budget:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            hidden = decode_step(janus, janus.get_input_embeddings()(token[:, None]), mask, positions, cache)
            positions = positions + 1

        results = []
        for row, query, row_budget in zip(out.tolist(), queries, budgets):
            row = row[:row_budget]
            finished = eos in row
            text = self.prompts.tokenizer.decode(row[: row.index(eos)] if finished else row, skip_special_tokens=True)
            results.append(read_answer(text, query, finished, row_budget))
        return results
