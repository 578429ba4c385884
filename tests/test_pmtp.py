import inspect

import pytest
import torch
from trl import SFTTrainer

from echogen_rl.data.collators import PMTPCollator
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.modeling import mixed_forward
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer, pmtp_losses


@pytest.fixture(scope="module")
def shapes():
    return build_shapes_dataset(16, seed=0)


def _examples(dataset, n):
    return [dataset[i] for i in range(n)]


def test_collator_packs_whole_samples_up_to_max_length(prompts, shapes):
    examples = _examples(shapes, 6)
    sizes = [sum(len(s) for s in PMTPCollator(prompts).segments(e, i)) for i, e in enumerate(examples)]
    limit = sizes[0] + sizes[1] + 1
    batch = PMTPCollator(prompts, max_length=limit)(examples)
    assert batch["input_ids"].shape[1] <= limit
    # Every sample's two segments sit in one row, as segments 2k and 2k+1.
    n_segments = int((batch["segment_ids"].max(dim=1).values + 1).sum())
    assert n_segments == 2 * len(examples)
    assert int((batch["segment_ids"] >= 0).sum()) == sum(sizes)  # padding-free up to the row ends
    row = batch["segment_ids"][0]
    first = batch["position_ids"][0][row == 1]
    assert first[0] == 0 and torch.equal(first, torch.arange(len(first)))  # positions restart per segment
    assert int(batch["image_mask"].sum()) == 2 * 64 * len(examples)


def test_oversized_sample_and_bad_layout_are_named(prompts, shapes):
    examples = _examples(shapes, 2)
    with pytest.raises(ValueError, match=r"example 0 .* more than max_length=50"):
        PMTPCollator(prompts, max_length=50)(examples)
    bad = dict(examples[1], layout='{"entities": [{"phrase": "red square", "box": [0.5, 0.5, 0.2, 0.9]}]}')
    with pytest.raises(ValueError, match=r"example 1 .*bad layout.*entity 0"):
        PMTPCollator(prompts)([examples[0], bad])


def test_no_leak_from_l2i_to_i2l(noisy_model, prompts, shapes):
    """Changing any L2I token leaves every I2L hidden state (hence logit) of the same row unchanged."""
    from echogen_rl.models.modeling import block_causal_mask

    batch = PMTPCollator(prompts)(_examples(shapes, 2))
    seg = batch["segment_ids"][0]
    l2i_text = (seg == 0) & ~batch["image_mask"][0]
    l2i_text[0] = False  # keep BOS
    ids = batch["input_ids"].clone()
    ids[0, l2i_text] = prompts.tokenizer.convert_tokens_to_ids("blue")
    ids[0, (seg == 0) & batch["image_mask"][0]] = 5  # and every L2I code

    def hidden(input_ids, mask):
        return mixed_forward(noisy_model, input_ids, batch["image_mask"], mask, batch["position_ids"])

    block = block_causal_mask(batch["segment_ids"])
    i2l = seg == 1
    torch.testing.assert_close(hidden(ids, block)[0, i2l], hidden(batch["input_ids"], block)[0, i2l], atol=0, rtol=0)
    varlen = {"position_ids": batch["position_ids"], "segment_ids": batch["segment_ids"]}
    changed = mixed_forward(noisy_model, ids, batch["image_mask"], **varlen)[0, i2l]
    torch.testing.assert_close(
        changed, mixed_forward(noisy_model, batch["input_ids"], batch["image_mask"], **varlen)[0, i2l], atol=0, rtol=0
    )
    # The same change does reach the I2L segment under a plain causal mask over the row: the test can fail.
    causal = block_causal_mask(torch.zeros_like(batch["segment_ids"]))
    assert not torch.allclose(hidden(ids, causal)[0, i2l], hidden(batch["input_ids"], causal)[0, i2l])


@pytest.mark.parametrize("segment_attention", [True, False])
def test_packed_and_unpacked_losses_agree(noisy_model, prompts, shapes, segment_attention):
    examples = _examples(shapes, 5)
    packed = pmtp_losses(noisy_model, PMTPCollator(prompts, max_length=600)(examples), segment_attention)
    unpacked = pmtp_losses(noisy_model, PMTPCollator(prompts, pack=False)(examples), segment_attention)
    for task in ("img", "text"):
        assert packed[task].count == unpacked[task].count > 0
        torch.testing.assert_close(packed[task].loss, unpacked[task].loss, atol=1e-5, rtol=1e-5)


def test_sft_hooks_we_override_still_exist():
    """TRL's trainer internals are private: pin the signatures PMTPTrainer relies on."""
    params = list(inspect.signature(SFTTrainer.compute_loss).parameters)
    assert params == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]
    assert list(inspect.signature(SFTTrainer.log).parameters) == ["self", "logs", "start_time"]
    assert "skip_prepare_dataset" in inspect.getsource(SFTTrainer.__init__)
    assert "_metrics" in inspect.getsource(SFTTrainer.log)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="pack_segments"):
        PMTPConfig(output_dir=str(tmp_path), packing=True, bf16=False)
    with pytest.raises(ValueError, match="image_loss_weight must be >= 0"):
        PMTPConfig(output_dir=str(tmp_path), image_loss_weight=-1, bf16=False)
    config = PMTPConfig(output_dir=str(tmp_path), bf16=False)
    assert config.dataset_kwargs["skip_prepare_dataset"] and not config.remove_unused_columns


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    return PMTPConfig(**{**base, **kw})


def test_trainer_steps_change_parameters_and_log_both_losses(tiny_model, tiny_tokenizer, shapes, tmp_path):
    before = tiny_model.model.generation_head.vision_head.weight.detach().clone()
    trainer = PMTPTrainer(tiny_model, _config(tmp_path), train_dataset=shapes, processing_class=tiny_tokenizer)
    trainer.train()
    assert not torch.equal(before, tiny_model.model.generation_head.vision_head.weight)
    logged = [h for h in trainer.state.log_history if "loss_img" in h]
    assert logged and all(k in logged[0] for k in ("loss_text", "accuracy_img", "tokens_per_second"))
    assert all(torch.isfinite(torch.tensor([h["loss_img"], h["loss_text"]])).all() for h in logged)


def test_empty_or_incomplete_dataset_fails_before_training(tiny_model, tiny_tokenizer, shapes, tmp_path):
    with pytest.raises(ValueError, match="training dataset is empty"):
        PMTPTrainer(tiny_model, _config(tmp_path), train_dataset=shapes.select([]), processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"lacks the columns \['image_codes'\]"):
        PMTPTrainer(
            tiny_model,
            _config(tmp_path),
            train_dataset=shapes.remove_columns(["image_codes"]),
            processing_class=tiny_tokenizer,
        )


def test_collator_blanks_l2i_prompts_at_the_configured_rate(prompts, shapes):
    many = build_shapes_dataset(200, seed=5)
    examples = [many[i] for i in range(200)]
    batch = PMTPCollator(prompts, uncond_prob=0.25, pack=False)(examples)
    again = PMTPCollator(prompts, uncond_prob=0.25, pack=False)(examples)
    assert torch.equal(batch["input_ids"], again["input_ids"])  # fixed by content: resume-safe
    l2i_rows = batch["image_labels"].ne(-100).any(dim=1)  # the L2I segments carry image labels
    blanked = (batch["input_ids"][l2i_rows, 2] == prompts.pad_id).float().mean()  # token 2 is caption text
    assert 0.15 < blanked < 0.35
    assert (PMTPCollator(prompts, pack=False)(examples)["input_ids"][l2i_rows, 2] != prompts.pad_id).all()


def test_single_task_collation_builds_only_that_segment(prompts, shapes):
    examples = _examples(shapes, 3)
    l2i_only = PMTPCollator(prompts, tasks=("l2i",))(examples)
    i2l_only = PMTPCollator(prompts, tasks=("i2l",))(examples)
    both = PMTPCollator(prompts)(examples)
    assert int((l2i_only["segment_ids"] >= 0).sum()) + int((i2l_only["segment_ids"] >= 0).sum()) == int(
        (both["segment_ids"] >= 0).sum()
    )
    assert (l2i_only["text_labels"] == -100).all() and (i2l_only["image_labels"] == -100).all()
    with pytest.raises(ValueError, match="tasks"):
        PMTPCollator(prompts, tasks=("vqa",))


def test_negative_shares_reach_the_collator_and_need_shapes_phrases(tiny_model, tiny_tokenizer, shapes, tmp_path):
    trainer = PMTPTrainer(
        tiny_model,
        _config(tmp_path, color_negative_prob=0.4, shuffle_grounding_queries=True),
        train_dataset=shapes,
        processing_class=tiny_tokenizer,
    )
    kinds = trainer.data_collator.kinds
    assert (kinds.prob, kinds.colors, kinds.redraw) == (0.0, 0.4, True)
    assert trainer.data_collator.shuffle_queries

    def rename(example):  # phrases outside the shapes world
        layout = Layout.from_json(example["layout"])
        return {"layout": Layout([Entity("thing", e.box) for e in layout.entities]).to_json()}

    with pytest.raises(ValueError, match="PMTPConfig.color_negative_prob needs shapes-world phrases"):
        PMTPTrainer(
            tiny_model,
            _config(tmp_path, color_negative_prob=0.4),
            train_dataset=shapes.map(rename),
            processing_class=tiny_tokenizer,
        )
