import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from echogen_rl.layout import LAYOUT_TAGS, Entity, Layout
from echogen_rl.layout_text import parse_layout
from echogen_rl.models.prompts import IGNORE_INDEX, PromptBuilder, add_layout_tokens, pad_segments

LAYOUT = Layout(
    [Entity("red circle", (0.125, 0.25, 0.5, 0.625)), Entity("blue square", (0.5, 0.0, 1.0, 0.5))], "two shapes"
)
CODES = [c % 9 for c in range(64)]


def test_l2i_labels_predict_each_code_from_the_position_before(prompts):
    seg = prompts.l2i(LAYOUT, CODES)
    boi = seg.input_ids.index(prompts.boi_id)
    assert seg.input_ids[boi + 1 :] == CODES and all(seg.image_mask[boi + 1 :]) and not any(seg.image_mask[: boi + 1])
    assert seg.image_labels[boi : boi + 64] == CODES  # `<begin_of_image>` predicts the first code
    assert seg.image_labels[-1] == IGNORE_INDEX and all(x == IGNORE_INDEX for x in seg.image_labels[:boi])
    assert all(x == IGNORE_INDEX for x in seg.text_labels)  # the prompt carries no loss
    assert seg.input_ids[0] == prompts.bos_id
    text = prompts.tokenizer.decode(seg.input_ids[:boi], skip_special_tokens=True)
    assert "two shapes" in text and parse_layout(text)[0].phrases == LAYOUT.phrases


def test_i2l_labels_are_the_answer_and_eos(prompts):
    seg = prompts.i2l(CODES, LAYOUT)
    labelled = [t for t in seg.text_labels if t != IGNORE_INDEX]
    answer = prompts.encode(LAYOUT.to_text()) + [prompts.eos_id]
    assert labelled == answer
    first = seg.text_labels.index(answer[0])
    assert seg.input_ids[first + 1 : first + 1 + len(answer)] == answer
    assert all(x == IGNORE_INDEX for x in seg.image_labels)  # the image is input here
    assert sum(seg.image_mask) == 64
    query = prompts.tokenizer.decode(seg.input_ids[: first + 1], skip_special_tokens=True)
    assert "locate : red circle ; blue square" in query


def test_detect_all_query_and_prompt_only_forms(prompts):
    seg = prompts.i2l(CODES, LAYOUT, detect_all=True)
    assert "detect all objects" in prompts.tokenizer.decode(seg.input_ids, skip_special_tokens=True)
    assert prompts.l2i_prompt(LAYOUT).input_ids[-1] == prompts.boi_id
    assert all(t == IGNORE_INDEX for t in prompts.i2l(CODES).text_labels)


def test_wrong_number_of_codes_is_named(prompts):
    with pytest.raises(ValueError, match="l2i: expected 64 image codes, got 3"):
        prompts.l2i(LAYOUT, [1, 2, 3])
    with pytest.raises(ValueError, match="i2l"):
        prompts.i2l([1] * 65, LAYOUT)


def test_pad_segments_left_and_right(prompts):
    a, b = prompts.l2i_prompt(LAYOUT), prompts.l2i_prompt(Layout([Entity("red circle", (0, 0, 1, 1))]))
    left = pad_segments([a, b], prompts.pad_id, "left")
    right = pad_segments([a, b], prompts.pad_id, "right")
    n = len(a) - len(b)
    assert n > 0
    assert left["attention_mask"][1, :n].sum() == 0 and left["input_ids"][1, n:].tolist() == b.input_ids
    assert right["attention_mask"][1, -n:].sum() == 0 and right["input_ids"][1, : len(b)].tolist() == b.input_ids
    assert left["image_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="padding_side"):
        pad_segments([a], 0, "middle")


def test_add_layout_tokens_to_a_tokenizer_without_them(tiny_model):
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<begin_of_image>", "<end_of_image>", "red"])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ValueError, match="layout tags"):
        PromptBuilder(tok, 64)
    before = tiny_model.get_input_embeddings().weight.shape[0]
    assert add_layout_tokens(tok, tiny_model) == 6
    assert add_layout_tokens(tok, tiny_model) == 0
    assert tiny_model.get_input_embeddings().weight.shape[0] == before  # never shrinks
    builder = PromptBuilder(tok, 64)
    ids = builder.encode(Layout([Entity("red", (0, 0, 1, 1))]).to_text())
    assert set(tok.convert_tokens_to_ids(list(LAYOUT_TAGS))) <= set(ids)
    tags = tok.convert_tokens_to_ids(list(LAYOUT_TAGS))
    assert min(tags) >= len(vocab)  # appended, each one token


def test_unconditional_segment_is_the_cfg_row_of_sampling(prompts):
    from echogen_rl.models.modeling import uncond_prompt_ids

    seg = prompts.l2i(LAYOUT, CODES)
    blank = prompts.unconditional(seg)
    n = len(prompts.l2i_prompt(LAYOUT))
    sampled = uncond_prompt_ids(torch.tensor([seg.input_ids[:n]]), prompts.bos_id, prompts.boi_id, prompts.pad_id)
    assert blank.input_ids[:n] == sampled[0].tolist()
    assert blank.input_ids[n:] == CODES and blank.image_labels == seg.image_labels  # the image is still learned
    assert set(blank.input_ids[1 : n - 1]) == {prompts.pad_id}
