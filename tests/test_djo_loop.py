"""DJO's loop on the model's own images: self-forced and autoregressive sources, a frozen grounder, their gradients."""

import pytest
import torch

from echogen_rl.data.collators import LoopLossCollator
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.rollout.torch_engine import TorchRolloutEngine
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.djo_loop import (
    autoregressive_loop,
    autoregressive_memory_gib,
    gumbel_at,
    image_prompts,
    sample_images,
    self_forced_logits,
)
from echogen_rl.trainer.djo_trainer import DJOTrainer, djo_losses


@pytest.fixture(scope="module")
def shapes():
    return build_shapes_dataset(8, seed=0)


def _batch(prompts, shapes, n=3):
    return LoopLossCollator(prompts)([shapes[i] for i in range(n)])


def _ids(prompts):
    return prompts.bos_id, prompts.boi_id, prompts.pad_id


def test_gumbel_at_is_the_sampled_code_forward_and_soft_backward():
    logits = torch.randn(500, 17, requires_grad=True)
    codes = torch.randint(0, 17, (500,))
    gen = torch.Generator().manual_seed(0)
    y = gumbel_at(logits, codes, tau=0.7, generator=gen)
    assert torch.equal(y.detach(), torch.nn.functional.one_hot(codes, 17).float())
    soft = gumbel_at(logits, codes, tau=0.7, hard=False, generator=gen)
    assert torch.equal(soft.argmax(-1), codes)  # the conditioned perturbation keeps the sampled code on top
    (y * torch.randn(17)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gumbel_at_noise_is_the_conditional_of_gumbel_max():
    """Averaged over draws, the soft sample conditioned on its argmax matches plain Gumbel-Softmax samples whose
    argmax happened to be that code (the same distribution, drawn two ways)."""
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -0.5, 0.3])
    plain = torch.nn.functional.gumbel_softmax(logits.expand(200_000, 4), tau=1.0)
    kept = plain[plain.argmax(-1) == 0].mean(0)
    gen = torch.Generator().manual_seed(1)
    conditioned = gumbel_at(logits.expand(50_000, 4), torch.zeros(50_000, dtype=torch.long), 1.0, False, gen).mean(0)
    assert torch.allclose(kept, conditioned, atol=0.01), (kept, conditioned)


def test_self_forced_sample_is_the_engines_and_its_pass_reads_it(noisy_model, prompts, shapes):
    batch = _batch(prompts, shapes)
    codes = sample_images(noisy_model, batch, _ids(prompts), 1.0, 1.0, torch.Generator().manual_seed(3))
    prompt, mask = image_prompts(batch, prompts.pad_id)
    engine = TorchRolloutEngine(noisy_model, 64, *_ids(prompts))
    again = engine.generate(prompt, mask, 1.0, 1.0, None, torch.Generator().manual_seed(3)).codes
    assert torch.equal(codes, again)
    assert not torch.equal(codes.reshape(-1), batch["l2i_image_labels"][batch["l2i_image_labels"] != -100])
    # Greedy: the pass over the model's own codes predicts each of them (its argmax is the next code).
    greedy = sample_images(noisy_model, batch, _ids(prompts), 1.0, 0.0)
    logits = self_forced_logits(noisy_model, batch, greedy)
    assert (logits.argmax(-1) == greedy.reshape(-1)).float().mean() > 0.99


def test_autoregressive_loop_reproduces_the_engines_codes_for_the_same_noise(noisy_model, prompts, shapes):
    batch = _batch(prompts, shapes, 2)
    prompt, mask = image_prompts(batch, prompts.pad_id)
    engine = TorchRolloutEngine(noisy_model, 64, *_ids(prompts))
    with torch.no_grad():
        sampled = engine.generate(prompt, mask, 1.0, 1.0, None, torch.Generator().manual_seed(5)).codes
        y, codes = autoregressive_loop(
            noisy_model, batch, prompts.pad_id, 0.5, generator=torch.Generator().manual_seed(5)
        )
        greedy = engine.generate(prompt, mask, 1.0, 0.0).codes
        _, zero = autoregressive_loop(noisy_model, batch, prompts.pad_id, 0.5, noise=torch.zeros(2, 64, y.shape[-1]))
    assert torch.equal(codes, sampled)
    assert torch.equal(zero, greedy)


@pytest.mark.parametrize("loop_image", ["teacher_forced", "self_forced", "autoregressive"])
def test_the_loop_gradient_reaches_the_generator_in_every_mode(noisy_model, prompts, shapes, loop_image):
    batch = _batch(prompts, shapes, 2)
    out = djo_losses(
        noisy_model, batch, 0.5, loop_image=loop_image, l2i_weight=0.0, special_ids=_ids(prompts),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    out.loss.backward()
    janus = unwrap_janus(noisy_model)
    assert janus.model.generation_head.vision_head.weight.grad.abs().sum() > 0
    # The L2I layers: the last decoder layer's MLP sits on the generator's path.
    assert janus.model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_a_frozen_grounder_takes_nothing_from_the_loop(noisy_model, prompts, shapes):
    """The frozen copy reads the loop and stays as it was; the policy then gets only the image side's gradient,
    which is less than what it gets when it reads the loop itself (the grounder's part is gone)."""
    import copy

    batch = _batch(prompts, shapes, 2)
    reader = copy.deepcopy(unwrap_janus(noisy_model)).requires_grad_(False)
    before = {k: v.clone() for k, v in reader.state_dict().items()}
    janus = unwrap_janus(noisy_model)
    layer = janus.model.language_model.layers[-1].self_attn.q_proj.weight
    grads = {}
    for name, grounder in (("frozen", reader), ("policy", None)):
        noisy_model.zero_grad(set_to_none=True)
        out = djo_losses(
            noisy_model, batch, 0.5, loop_image="self_forced", grounder=grounder, l2i_weight=0.0,
            special_ids=_ids(prompts), generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        out.loss.backward()
        assert janus.model.generation_head.vision_head.weight.grad.abs().sum() > 0  # the generator learns
        grads[name] = layer.grad.clone()
    assert not torch.allclose(grads["frozen"], grads["policy"])
    assert all(torch.equal(v, reader.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in reader.parameters())


def test_djo_trainer_with_a_frozen_grounder_changes_only_the_generator_side(
    tiny_model, tiny_tokenizer, shapes, tmp_path
):
    args = DJOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=1,
        loop_image="self_forced", loop_grounder="frozen", l2i_loss_weight=0.0,
    )  # fmt: skip
    trainer = DJOTrainer(tiny_model, args, train_dataset=shapes, processing_class=tiny_tokenizer)
    head = unwrap_janus(trainer.model).model.generation_head.vision_head.weight.clone()
    reader = {k: v.clone() for k, v in trainer.loop_reader.state_dict().items()}
    trainer.train()
    assert not torch.equal(unwrap_janus(trainer.model).model.generation_head.vision_head.weight, head)
    assert all(torch.equal(v, trainer.loop_reader.state_dict()[k]) for k, v in reader.items())
    logged = trainer.state.log_history[0]
    assert logged["grad_norm_loop/generation_head"] > 0 and "loss_loop" in logged


def test_real_image_grounding_loss_is_logged_and_trains(tiny_model, tiny_tokenizer, shapes, tmp_path):
    args = DJOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=1, i2l_loss_weight=1.0,
    )  # fmt: skip
    trainer = DJOTrainer(tiny_model, args, train_dataset=shapes, processing_class=tiny_tokenizer)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss_i2l"] > 0 and logged["grad_norm_l2i/generation_head"] > 0


def test_an_autoregressive_loop_that_cannot_fit_is_refused(tiny_model, tiny_tokenizer, shapes, tmp_path):
    args = DJOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        loop_image="autoregressive", loop_memory_limit_gib=1e-6,
    )  # fmt: skip
    with pytest.raises(ValueError, match="autoregressive.*GiB of activations"):
        DJOTrainer(tiny_model, args, train_dataset=shapes, processing_class=tiny_tokenizer)
    # Janus-Pro-1B at batch 1: 576 forwards keep hundreds of GiB.
    assert autoregressive_memory_gib(2048, 24, 64, 576, 1, bytes_per=2) > 80
    with pytest.raises(ValueError, match="straight_through"):
        DJOConfig(output_dir=str(tmp_path), use_cpu=True, loop_image="autoregressive", straight_through=False)
    with pytest.raises(ValueError, match="loop_image"):
        DJOConfig(output_dir=str(tmp_path), use_cpu=True, loop_image="dreamed")
