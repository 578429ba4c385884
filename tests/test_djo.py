import math
import runpy
from pathlib import Path

import pytest
import torch
from trl import TrlParser

from echogen_rl.data.collators import LoopLossCollator, PMTPCollator
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.data.sources import LayoutDataArguments
from echogen_rl.models.loading import JanusModelConfig
from echogen_rl.models.modeling import embed_codes, soft_code_embeddings
from echogen_rl.models.prompts import IGNORE_INDEX
from echogen_rl.trainer import djo_trainer
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.djo_trainer import DJOTrainer, djo_losses, gumbel_tau, soft_image_tokens, warmup_loop_weight
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import pmtp_losses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes():
    return build_shapes_dataset(16, seed=0)


def _examples(dataset, n):
    return [dataset[i] for i in range(n)]


def test_collator_pairs_l2i_labels_with_i2l_image_positions(prompts, shapes):
    batch = LoopLossCollator(prompts)(_examples(shapes, 4))
    labels = batch["l2i_image_labels"]
    assert ((labels != IGNORE_INDEX).sum(1) == 64).all() and (batch["i2l_image_mask"].sum(1) == 64).all()
    # In row-major order, the code each L2I position predicts is the code at the matching I2L image position.
    assert torch.equal(labels[labels != IGNORE_INDEX], batch["i2l_input_ids"][batch["i2l_image_mask"]])
    assert (batch["i2l_text_labels"] != IGNORE_INDEX).sum(1).min() > 0  # every sample has a layout answer
    assert not (batch["l2i_attention_mask"][:, 0] == 0).any()  # right padding


def test_bad_examples_are_named(prompts, shapes):
    good = _examples(shapes, 1)[0]
    bad_layout = dict(good, layout='{"entities": [{"phrase": "red square", "box": [0.5, 0.5, 0.2, 0.9]}]}')
    with pytest.raises(ValueError, match=r"example 1 .*bad layout.*entity 0"):
        LoopLossCollator(prompts)([good, bad_layout])
    with pytest.raises(ValueError, match=r"example 1 .*expected 64 image codes, got 3"):
        LoopLossCollator(prompts)([good, dict(good, image_codes=[1, 2, 3])])
    with pytest.raises(ValueError, match=r"example 0 .*more than max_length=50"):
        LoopLossCollator(prompts, max_length=50)([good])


def _detached_soft_tokens(model, logits, tau, straight_through=True, generator=None):
    y, _ = soft_image_tokens(model, logits, tau, straight_through, generator)
    return y, soft_code_embeddings(model, y.detach())


@pytest.mark.parametrize("straight_through", [True, False])
def test_loop_loss_gradient_reaches_the_l2i_path(noisy_model, prompts, shapes, monkeypatch, straight_through):
    batch = LoopLossCollator(prompts)(_examples(shapes, 3))
    head = noisy_model.model.generation_head.vision_head.weight
    first_layer = noisy_model.model.language_model.layers[0].self_attn.q_proj.weight

    def loop_grads():
        noisy_model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        djo_losses(noisy_model, batch, tau=1.0, straight_through=straight_through).loop.loss.backward()
        return head.grad, first_layer.grad.clone()

    head_grad, layer_grad = loop_grads()
    assert head_grad is not None and head_grad.abs().sum() > 0
    # Control: the same loss with the soft tokens cut off from the L2I logits leaves the image head untouched,
    # and the language model's gradient loses its L2I share.
    monkeypatch.setattr(djo_trainer, "soft_image_tokens", _detached_soft_tokens)
    cut_head_grad, cut_layer_grad = loop_grads()
    assert cut_head_grad is None
    assert not torch.allclose(layer_grad, cut_layer_grad)


def test_straight_through_forward_is_a_real_code_with_soft_gradients(noisy_model):
    torch.manual_seed(0)
    logits = torch.randn(32, 9, requires_grad=True)
    y, e = soft_image_tokens(noisy_model, logits, tau=0.5, straight_through=True)
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0} and torch.equal(y.sum(-1), torch.ones(32))
    torch.testing.assert_close(e, embed_codes(noisy_model, y.argmax(-1)), atol=1e-6, rtol=1e-6)
    e.pow(2).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_soft_tokens_without_straight_through_are_mixtures(noisy_model):
    torch.manual_seed(0)
    y, e = soft_image_tokens(noisy_model, torch.randn(32, 9), tau=1.0, straight_through=False)
    assert (y >= 0).all() and torch.allclose(y.sum(-1), torch.ones(32))
    assert (y.max(-1).values < 0.999).all()  # no row is one-hot
    janus = noisy_model.model
    torch.testing.assert_close(e, janus.generation_aligner(y @ janus.generation_embeddings.weight))


def test_the_teacher_forced_loop_draws_its_noise_from_the_generator_given(noisy_model, prompts, shapes):
    """As the generated loop images do: the same seed, the same loop loss; another seed, another; the global RNG
    is left alone."""
    batch = LoopLossCollator(prompts)(_examples(shapes, 3))

    def loop_loss(seed):
        generator = torch.Generator().manual_seed(seed)
        return djo_losses(noisy_model, batch, tau=1.0, loop_image="teacher_forced", generator=generator).loop.loss

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first, again, other = loop_loss(0), loop_loss(0), loop_loss(1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again) and not torch.equal(first, other)
    # Without a generator the noise is the global RNG's, which a seed fixes.
    torch.manual_seed(5)
    unset = djo_losses(noisy_model, batch, tau=1.0, loop_image="teacher_forced").loop.loss
    torch.manual_seed(5)
    assert torch.equal(unset, djo_losses(noisy_model, batch, tau=1.0, loop_image="teacher_forced").loop.loss)


def test_zero_loop_weight_is_the_pmtp_image_loss(noisy_model, prompts, shapes):
    examples = _examples(shapes, 5)
    pmtp = pmtp_losses(noisy_model, PMTPCollator(prompts)(examples))["img"].loss
    djo = djo_losses(noisy_model, LoopLossCollator(prompts)(examples), tau=1.0, loop_weight=0.0)
    torch.testing.assert_close(djo.loss, pmtp, atol=1e-5, rtol=1e-5)
    assert djo.loop.count > 0 and djo.loop.loss > 0  # the loop is still computed (and logged)


def test_tau_schedule_and_loop_weight_warmup():
    assert gumbel_tau(0, 1.0, 0.3, 100) == 1.0
    assert gumbel_tau(50, 1.0, 0.3, 100) == pytest.approx(math.sqrt(0.3))  # geometric mean halfway
    assert gumbel_tau(100, 1.0, 0.3, 100) == pytest.approx(0.3)
    assert gumbel_tau(400, 1.0, 0.3, 100) == pytest.approx(0.3)
    assert {gumbel_tau(s, 1.0, 0.3, 100, "constant") for s in (0, 50, 400)} == {1.0}
    assert [warmup_loop_weight(s, 2.0, 10) for s in (0, 5, 10, 30)] == [0.0, 1.0, 2.0, 2.0]
    assert warmup_loop_weight(0, 2.0, 0) == 2.0


def test_config_validation_names_the_field(tmp_path):
    base = dict(output_dir=str(tmp_path), bf16=False)
    for field, value in [
        ("loop_weight", -1.0),
        ("loop_weight_warmup_steps", -2),
        ("gumbel_tau_start", 0.0),
        ("gumbel_tau_end", -0.1),
        ("tau_schedule", "linear"),
        ("tau_anneal_steps", 0),
    ]:
        with pytest.raises(ValueError, match=rf"DJOConfig\.{field} must"):
            DJOConfig(**base, **{field: value})
    with pytest.raises(ValueError, match="packing"):
        DJOConfig(**base, packing=True)
    config = DJOConfig(**base)
    assert config.dataset_kwargs["skip_prepare_dataset"] and not config.remove_unused_columns


def test_trainer_steps_change_parameters_and_log_the_schedule(tiny_model, tiny_tokenizer, shapes, tmp_path):
    config = DJOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=2,
        loop_weight=0.5,
        loop_weight_warmup_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    before = tiny_model.model.generation_head.vision_head.weight.detach().clone()
    trainer = DJOTrainer(tiny_model, config, train_dataset=shapes, processing_class=tiny_tokenizer)
    trainer.train()
    assert not torch.equal(before, tiny_model.model.generation_head.vision_head.weight)
    logged = [h for h in trainer.state.log_history if "loss_loop" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        assert all(math.isfinite(h[k]) for k in ("loss_l2i", "loss_loop", "accuracy_l2i", "accuracy_loop"))
        # The values of the step that ran last (global step h["step"] - 1), annealed over the run's 4 steps.
        assert h["tau"] == pytest.approx(gumbel_tau(h["step"] - 1, 1.0, 0.3, 4))
        assert h["loop_weight"] == pytest.approx(warmup_loop_weight(h["step"] - 1, 0.5, 2))


def test_recipe_without_its_pmtp_checkpoint_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = runpy.run_path(str(ROOT / "recipes/djo.py"))
    parser = TrlParser((LayoutDataArguments, DJOConfig, JanusModelConfig))
    args = parser.parse_args_and_config(
        ["--config", str(ROOT / "recipes/configs/djo/shapes_tiny.yaml"), "--use_cpu", "--report_to", "none"]
    )
    with pytest.raises(
        SystemExit, match="accelerate launch recipes/pmtp.py --config recipes/configs/pmtp/shapes_tiny_kinds.yaml"
    ):
        recipe["main"](*args)


def test_pmtps_second_phase_without_its_first_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = runpy.run_path(str(ROOT / "recipes/pmtp.py"))
    parser = TrlParser((LayoutDataArguments, PMTPConfig, JanusModelConfig))
    config = [
        "--config",
        str(ROOT / "recipes/configs/pmtp/shapes_tiny_kinds.yaml"),
        "--use_cpu",
        "--report_to",
        "none",
    ]
    with pytest.raises(
        SystemExit, match="accelerate launch recipes/pmtp.py --config recipes/configs/pmtp/shapes_tiny.yaml"
    ):
        recipe["main"](*parser.parse_args_and_config(config))


def test_a_missing_local_start_that_no_config_makes_is_named(tmp_path, monkeypatch):
    from echogen_rl.models.loading import require_start_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(SystemExit, match=r"no checkpoint at outputs/pmtp-typo .*no shipped pmtp config writes it"):
        require_start_checkpoint("outputs/pmtp-typo", ROOT / "recipes/pmtp.py")
    require_start_checkpoint("deepseek-community/Janus-Pro-1B", ROOT / "recipes/pmtp.py")  # a hub id passes


def test_negative_shares_reach_the_loop_collator_as_queries_only(tiny_model, tiny_tokenizer, shapes, tmp_path):
    config = DJOConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, kind_negative_prob=0.2, color_negative_prob=0.3, shuffle_grounding_queries=True,
    )  # fmt: skip
    collator = DJOTrainer(tiny_model, config, train_dataset=shapes, processing_class=tiny_tokenizer).data_collator
    assert (collator.kinds.prob, collator.kinds.colors, collator.kinds.redraw) == (0.2, 0.3, False)
    assert collator.shuffle_queries
