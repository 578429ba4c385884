"""Resume: N steps in one go equal N/2 steps, a checkpoint, and N/2 more in a fresh Trainer resumed from it.

Everything that decides the next step comes back from the checkpoint: weights, optimizer and scheduler state, the
position in the data order, and the global torch RNG (DJO's Gumbel noise and CycleRL's image sampling draw from it).
"""

from pathlib import Path

import torch
from peft import LoraConfig
from transformers import JanusForConditionalGeneration, TrainerCallback

from echogen_rl.data.random_layouts import build_random_layout_dataset
from echogen_rl.data.shapes import build_shapes_dataset, phrase_pool
from echogen_rl.models.loading import DEFAULT_LORA_TARGETS
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.djo_trainer import DJOTrainer
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer


class StopAt(TrainerCallback):
    """Stops training after `step` (after that step's checkpoint is saved), as an interrupted run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _args(output_dir: Path, max_steps: int) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=max_steps // 2,
        learning_rate=1e-3,  # the default linear decay: the schedule must resume too
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )


def _trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _losses(trainer) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def _assert_resume_matches(make_trainer, tmp_path: Path, max_steps: int):
    """Trains in one go and with an interruption at max_steps // 2; returns the checkpoint and the final params."""
    whole = make_trainer(tmp_path / "whole")
    whole.train()
    interrupted = make_trainer(tmp_path / "split")
    interrupted.add_callback(StopAt(max_steps // 2))
    interrupted.train()
    assert interrupted.state.global_step == max_steps // 2
    checkpoint = tmp_path / "split" / f"checkpoint-{max_steps // 2}"
    resumed = make_trainer(tmp_path / "split")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == whole.state.global_step == max_steps
    # The same batches in the same order gave the same loss at every step, before and after the resume.
    assert _losses(resumed) == _losses(whole) and len(_losses(whole)) == max_steps
    expected, got = _trainable(whole), _trainable(resumed)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    return checkpoint, expected


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_pmtp_resume_equals_an_uninterrupted_run(tiny_checkpoint, tiny_tokenizer, tmp_path):
    shapes = build_shapes_dataset(16, seed=0)  # 4 steps an epoch: the resumed half crosses into epoch 2

    def make(output_dir, model=tiny_checkpoint):
        config = PMTPConfig(**_args(output_dir, 6), per_device_train_batch_size=4)
        model = JanusForConditionalGeneration.from_pretrained(model)
        return PMTPTrainer(model, config, train_dataset=shapes, processing_class=tiny_tokenizer)

    checkpoint, expected = _assert_resume_matches(make, tmp_path, 6)
    # Control: the checkpoint's weights trained 3 more steps without its trainer state (fresh optimizer, schedule
    # and data order) end elsewhere, so the equality above is the resume's doing.
    weights_only = make(tmp_path / "weights-only", model=checkpoint)
    weights_only.args.max_steps = 3
    weights_only.train()
    assert _max_difference(_trainable(weights_only), expected) > 1e-4


def test_djo_resume_restores_the_gumbel_noise(tiny_checkpoint, tiny_tokenizer, tmp_path):
    shapes = build_shapes_dataset(16, seed=0)

    def make(output_dir):
        config = DJOConfig(**_args(output_dir, 6), per_device_train_batch_size=4, loop_weight=0.5)
        model = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
        return DJOTrainer(model, config, train_dataset=shapes, processing_class=tiny_tokenizer)

    checkpoint, expected = _assert_resume_matches(make, tmp_path, 6)
    # Control: without the saved RNG state the Gumbel-Softmax samples differ, and so does the result.
    (checkpoint / "rng_state.pth").unlink()
    no_rng = make(tmp_path / "split")
    no_rng.train(resume_from_checkpoint=str(checkpoint))
    assert _max_difference(_trainable(no_rng), expected) > 1e-5


def _cyclerl_maker(checkpoint, tokenizer, max_steps: int, **overrides):
    prompts = build_random_layout_dataset(16, 0, phrase_pool(), grid_size=8)

    def make(output_dir):
        config = CycleRLConfig(
            **_args(output_dir, max_steps),
            per_device_train_batch_size=8,
            num_generations=4,
            beta=0.04,
            grounding_model="reference",
            **overrides,
        )
        model = JanusForConditionalGeneration.from_pretrained(checkpoint)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS)
        # box_fill varies between images; an untrained grounder's cycle reward is 0 everywhere (no advantage).
        rewards = ["cycle_iou", "rewards/custom_reward.py:box_fill"]
        return CycleRLTrainer(
            model, rewards, config, train_dataset=prompts, processing_class=tokenizer, peft_config=lora
        )

    return make


def test_cyclerl_resume_restores_the_image_sampling(tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the example reward is named by its path
    make = _cyclerl_maker(tiny_checkpoint, tiny_tokenizer, 4)
    checkpoint, expected = _assert_resume_matches(make, tmp_path, 4)
    assert all("lora_" in n for n in expected)
    # Control: rollouts sample from the global torch RNG; without its saved state the images and the update differ.
    (checkpoint / "rng_state.pth").unlink()
    no_rng = make(tmp_path / "split")
    no_rng.train(resume_from_checkpoint=str(checkpoint))
    assert _max_difference(_trainable(no_rng), expected) > 1e-5


def test_cyclerl_resume_with_reused_rollouts_at_a_generation_boundary(
    tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch
):
    # With num_iterations=2 each batch of rollouts trains two steps. TRL does not checkpoint the buffered rollouts,
    # so a resume regenerates them: it equals the uninterrupted run when the checkpoint falls between two rollout
    # batches (step 2 here), not inside one.
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    _assert_resume_matches(_cyclerl_maker(tiny_checkpoint, tiny_tokenizer, 4, num_iterations=2), tmp_path, 4)
