"""The grounder's "not present" answer: grammar, query matching, training rows and the reward it gives."""

import pytest
import torch

from echogen_rl.data.collators import AbsentPhrases, LoopLossCollator, PMTPCollator, dataset_phrases
from echogen_rl.data.shapes import build_shapes_dataset, phrase_pool
from echogen_rl.layout import Entity, Layout, grounding_answer
from echogen_rl.layout_text import parse_layout
from echogen_rl.models.grounding import restrict_to_phrases
from echogen_rl.models.prompts import IGNORE_INDEX
from echogen_rl.rewards import cycle_iou, grounding_format
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.pmtp_config import PMTPConfig

RED = Entity("red circle", (0.0, 0.0, 0.5, 0.5))
BLUE = Entity("blue square", (0.5, 0.5, 1.0, 1.0))


@pytest.fixture(scope="module")
def shapes():
    return build_shapes_dataset(64, seed=0)


def test_answer_writes_boxes_in_query_order_and_an_empty_box_for_an_absent_phrase():
    layout = Layout([RED, BLUE])
    text = grounding_answer(["blue square", "green triangle", "red circle"], layout)
    assert text == (
        "<grounding><ref>blue square</ref><box>[500, 500, 1000, 1000]</box>"
        "<ref>green triangle</ref><box>[]</box><ref>red circle</ref><box>[0, 0, 500, 500]</box></grounding>"
    )
    assert grounding_answer(layout.phrases, layout) == layout.to_text()
    parsed, problems = parse_layout(text)
    assert problems == []
    assert parsed.entities == [BLUE, RED] and parsed.absent == ["green triangle"]
    # The tiny word-level tokenizer decodes "[]" as "[ ]"; an empty <ref> is still a problem.
    assert parse_layout("<grounding><ref>red circle</ref><box>[ ]</box></grounding>")[0].absent == ["red circle"]
    assert parse_layout("<grounding><ref></ref><box>[]</box></grounding>")[1] == [
        "entity 0: field 'phrase' is empty: ''"
    ]


def test_layout_json_round_trips_absent_phrases_and_rejects_a_bad_list():
    layout = Layout([RED], "a caption", ["blue square"])
    assert Layout.from_json(layout.to_json()) == layout
    assert "absent" not in Layout([RED]).to_dict()  # datasets written before keep their form
    with pytest.raises(ValueError, match="field 'absent' must be a list of phrases"):
        Layout.from_dict({"entities": [], "absent": "blue square"})


def test_restrict_to_phrases_takes_not_present_as_a_clean_answer():
    text = "<grounding><ref>red circle</ref><box>[0, 0, 500, 500]</box><ref>blue square</ref><box>[]</box></grounding>"
    layout, problems = restrict_to_phrases(parse_layout(text)[0], ["red circle", "blue square"])
    assert problems == [] and layout.entities == [RED] and layout.absent == ["blue square"]
    # The positional rule (as many boxes as phrases) counts only the phrases not answered absent.
    text = "<grounding><ref>red circl</ref><box>[0, 0, 500, 500]</box><ref>blue square</ref><box>[]</box></grounding>"
    layout, problems = restrict_to_phrases(parse_layout(text)[0], ["red circle", "blue square"])
    assert layout.entities == [RED] and layout.absent == ["blue square"]
    assert problems == ["phrase 0 ('red circle'): the answer named it 'red circl'"]


def test_cycle_reward_ranks_a_box_above_not_present_and_format_accepts_it():
    target = Layout([RED, BLUE])
    found = Layout([RED, BLUE])
    refused = restrict_to_phrases(parse_layout(grounding_answer(target.phrases, Layout([BLUE])))[0], target.phrases)
    rewards = cycle_iou(None, None, target_layouts=[target, target], recovered_layouts=[found, refused[0]])
    assert rewards == [1.0, 0.5]
    assert grounding_format(None, None, grounding_problems=[[], refused[1]]) == [1.0, 1.0]


def test_absent_queries_are_deterministic_hard_half_the_time_and_never_name_a_present_phrase(shapes):
    absent = AbsentPhrases(1.0, phrase_pool())
    hard = 0
    for i in range(64):
        example = shapes[i]
        layout = Layout.from_json(example["layout"])
        query = absent.query(example, layout)
        assert query == absent.query(dict(example), layout)  # fixed by the content
        extra = [p for p in query if p not in layout.phrases]
        assert len(query) == len(layout) + 1 and len(extra) == 1
        assert [p for p in query if p in layout.phrases] == layout.phrases  # order kept
        words = {w for p in layout.phrases for w in p.split()}
        hard += bool(words & set(extra[0].split()))
    # Half are drawn among phrases sharing a word; the other half from the whole pool, where some share one too.
    assert 32 <= hard < 64
    assert AbsentPhrases(0.0, phrase_pool()).query(shapes[0], Layout.from_json(shapes[0]["layout"])) is None
    with pytest.raises(ValueError, match="prob must be in"):
        AbsentPhrases(1.5, phrase_pool())
    with pytest.raises(ValueError, match="pool is empty"):
        AbsentPhrases(0.5, [])


def test_collators_train_the_not_present_answer(prompts, shapes):
    pool = dataset_phrases(shapes)
    assert set(pool) <= set(phrase_pool()) and len(pool) > 10
    examples = [shapes[i] for i in range(16)]
    absent = AbsentPhrases(0.5, pool)
    empty_box = prompts.encode("<box>[]</box>")
    for batch, key in (
        (PMTPCollator(prompts, absent=absent, pack=False)(examples), "text_labels"),
        (LoopLossCollator(prompts, absent=absent)(examples), "i2l_text_labels"),
    ):
        labels = batch[key]
        rows = [[t for t in row.tolist() if t != IGNORE_INDEX] for row in labels]
        with_absent = sum(any(r[i : i + len(empty_box)] == empty_box for i in range(len(r))) for r in rows)
        expected = sum(absent.query(e, Layout.from_json(e["layout"])) is not None for e in examples)
        assert 0 < with_absent == expected < 16
    plain = LoopLossCollator(prompts)(examples)
    assert not torch.equal(plain["i2l_input_ids"], LoopLossCollator(prompts, absent=absent)(examples)["i2l_input_ids"])


@pytest.mark.parametrize("config", [PMTPConfig, DJOConfig])
@pytest.mark.parametrize("name", ["absent_phrase_prob", "kind_negative_prob", "color_negative_prob"])
def test_configs_check_negative_shares(config, name, tmp_path):
    with pytest.raises(ValueError, match=rf"{config.__name__}.{name} must be in \[0, 1\]"):
        config(output_dir=str(tmp_path), use_cpu=True, **{name: -0.1})
