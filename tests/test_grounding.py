import pytest
import torch

from echogen_rl.layout import Entity, Layout
from echogen_rl.layout_text import parse_layout
from echogen_rl.models.grounding import Grounder, read_answer, restrict_to_phrases
from echogen_rl.models.modeling import embed_mixed
from echogen_rl.models.prompts import pad_segments

PHRASES = [["red circle", "blue square"], ["green triangle"], ["white rectangle", "red circle", "cyan square"]]


def _codes(n, seed=0):
    return torch.randint(0, 9, (n, 64), generator=torch.Generator().manual_seed(seed))


def test_batched_decoding_equals_transformers_generate_per_image(noisy_model, prompts):
    codes = _codes(3)
    results = Grounder(noisy_model, prompts, batch_size=2)(codes, PHRASES)
    for i, res in enumerate(results):
        seg = prompts.i2l_prefix(codes[i].tolist())
        seg.add_text(prompts.i2l_query_ids(PHRASES[i]))
        b = pad_segments([seg], prompts.pad_id)
        out = noisy_model.generate(
            inputs_embeds=embed_mixed(noisy_model, b["input_ids"], b["image_mask"]),
            attention_mask=b["attention_mask"],
            max_new_tokens=Grounder(noisy_model, prompts).answer_budget(PHRASES[i]),
            do_sample=False,
            eos_token_id=prompts.eos_id,
            pad_token_id=prompts.pad_id,
        )[0].tolist()
        if prompts.eos_id in out:
            out = out[: out.index(prompts.eos_id)]
        assert res.text == prompts.tokenizer.decode(out, skip_special_tokens=True)


def test_garbage_output_gives_one_result_per_image_with_problems(noisy_model, prompts):
    results = Grounder(noisy_model, prompts)(_codes(3), PHRASES)
    assert len(results) == 3
    for res, phrases in zip(results, PHRASES):
        assert set(res.layout.phrases) <= set(phrases)
        assert res.problems  # a random model does not answer in the format
        assert len(res.layout) + sum("no box" in p for p in res.problems) == len(phrases)
        assert res.layout.phrases == [p for p in phrases if p in res.layout.phrases]  # query order


def test_detect_all_query_runs_and_is_bounded(noisy_model, prompts):
    res = Grounder(noisy_model, prompts)(_codes(2), None, max_new_tokens=12)
    assert len(res) == 2 and all(len(prompts.encode(r.text)) <= 12 for r in res)


def test_restrict_to_phrases_matches_misnamed_entities_by_position():
    text = Layout([Entity("cyan circle", (0.25, 0.1, 0.6, 0.5)), Entity("blue square", (0.5, 0, 1, 0.5))]).to_text()
    layout, problems = restrict_to_phrases(parse_layout(text)[0], ["cyan triangle", "blue square", "red circle"])
    assert layout.phrases == ["cyan triangle", "blue square"]
    assert layout.boxes[0] == (0.25, 0.1, 0.6, 0.5)
    assert problems == [
        "phrase 0 ('cyan triangle'): the answer named it 'cyan circle'",
        "phrase 2 ('red circle'): no box in the answer",
    ]


def test_restrict_to_phrases_answers_by_position_when_counts_agree():
    text = Layout([Entity("white circle", (0, 0, 0.5, 0.4)), Entity("orange triangle", (0.5, 0, 1, 0.5))]).to_text()
    layout, problems = restrict_to_phrases(parse_layout(text)[0], ["orange triangle", "purple square"])
    assert layout.phrases == ["orange triangle", "purple square"]
    assert layout.boxes == [(0.0, 0.0, 0.5, 0.4), (0.5, 0.0, 1.0, 0.5)]
    assert len(problems) == 2 and "named it 'white circle'" in problems[0]


def test_restrict_to_phrases_keeps_query_order_and_reports_missing():
    text = Layout([Entity("blue square", (0.5, 0, 1, 0.5)), Entity("Red  Circle", (0, 0, 0.5, 0.5))]).to_text()
    parsed, problems = parse_layout(text)
    assert not problems
    layout, problems = restrict_to_phrases(parsed, ["red circle", "green triangle", "blue square"])
    assert layout.phrases == ["red circle", "blue square"]
    assert layout.boxes == [(0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5)]
    assert problems == ["phrase 1 ('green triangle'): no box in the answer"]


def test_mismatched_phrase_lists_are_rejected(tiny_model, prompts):
    with pytest.raises(ValueError, match="2 images but 1 phrase lists"):
        Grounder(tiny_model, prompts)(_codes(2), [["red circle"]])


def test_read_answer_tells_unreadable_text_from_a_misnamed_phrase():
    query = ["red circle", "blue square"]
    misnamed = Layout([Entity("red circle", (0, 0, 0.5, 0.5)), Entity("blue circle", (0.5, 0, 1, 0.5))]).to_text()
    result = read_answer(misnamed, query, finished=True, budget=40)
    assert not result.malformed and result.problems == ["phrase 1 ('blue square'): the answer named it 'blue circle'"]
    assert result.layout.phrases == query

    clean = read_answer(Layout([Entity("red circle", (0, 0, 0.5, 0.5))]).to_text(), query[:1], True, 40)
    assert not clean.malformed and not clean.problems

    cut = read_answer("<grounding> <ref> red circle </ref> <box> [ 1 , 2", query, finished=True, budget=40)
    assert cut.malformed and cut.problems and len(cut.layout) == 0

    unfinished = read_answer(misnamed, query, finished=False, budget=40)
    assert unfinished.malformed and "no end of answer within 40 tokens" in unfinished.problems
