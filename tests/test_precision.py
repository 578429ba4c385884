"""The options the GPU configs turn on, on the tiny model: gradient checkpointing and bf16 autocast over fp32 weights.

Every stage through its trainer: with `gradient_checkpointing=True` the losses and the updated weights equal those of
a run without it (segment attention must hold while the backward pass recomputes each layer); with `bf16=True` over
float32 weights (mixed precision) a step trains and the weights stay float32, so an update far below bf16's
resolution still changes them.
"""

import warnings

import pytest
import torch
from accelerate.utils import DistributedType
from transformers import JanusForConditionalGeneration

from echogen_rl.data.random_layouts import build_random_layout_dataset
from echogen_rl.data.shapes import build_shapes_dataset, phrase_pool
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.djo_trainer import DJOTrainer
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer

STAGES = ("pmtp", "djo", "cyclerl")


def mean_code(prompts, completions, image_codes, **kwargs):
    """A reward that differs between images (an untrained grounder's cycle reward is 0 everywhere)."""
    return [sum(codes) / len(codes) for codes in image_codes]


def _trainer(stage: str, checkpoint, tokenizer, tmp_path, dtype=torch.float32, **overrides):
    args = dict(
        output_dir=str(tmp_path / stage),
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    args.update(overrides)
    model = JanusForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    shapes = build_shapes_dataset(16, seed=0)
    if stage == "pmtp":
        return PMTPTrainer(
            model, PMTPConfig(**args, per_device_train_batch_size=4), shapes, processing_class=tokenizer
        )
    if stage == "djo":
        config = DJOConfig(**args, per_device_train_batch_size=4, loop_weight=0.5)
        return DJOTrainer(model, config, shapes, processing_class=tokenizer)
    config = CycleRLConfig(
        **args, per_device_train_batch_size=4, num_generations=4, beta=0.0, grounding_model="policy"
    )
    prompts = build_random_layout_dataset(8, 0, phrase_pool(), grid_size=8)
    return CycleRLTrainer(model, [mean_code], config, train_dataset=prompts, processing_class=tokenizer)


def _trained(trainer) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return losses, params


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_checkpointing_gives_the_same_losses_and_updates(tiny_checkpoint, tiny_tokenizer, tmp_path, stage):
    plain_losses, plain = _trained(_trainer(stage, tiny_checkpoint, tiny_tokenizer, tmp_path))
    trainer = _trainer(stage, tiny_checkpoint, tiny_tokenizer, tmp_path, gradient_checkpointing=True)
    losses, params = _trained(trainer)
    assert all(layer.gradient_checkpointing for layer in trainer.model.model.language_model.layers)
    assert len(losses) == 2 and losses == pytest.approx(plain_losses, abs=1e-5)
    for name in plain:
        torch.testing.assert_close(params[name], plain[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("stage", STAGES)
def test_bf16_autocast_over_fp32_weights_trains(tiny_checkpoint, tiny_tokenizer, tmp_path, stage):
    trainer = _trainer(stage, tiny_checkpoint, tiny_tokenizer, tmp_path, bf16=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    losses, after = _trained(trainer)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after if "language_model.layers" in n)


def _fraction_changed_by_a_tiny_update(checkpoint, tokenizer, tmp_path, dtype) -> float:
    trainer = _trainer(
        "pmtp", checkpoint, tokenizer, tmp_path, dtype=dtype, bf16=True, max_steps=1, learning_rate=1e-6
    )
    weight = trainer.model.model.language_model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    trainer.train()
    return (weight.detach() != before).float().mean().item()


def test_an_update_of_1e_6_changes_fp32_master_weights_and_not_bf16_ones(tiny_checkpoint, tiny_tokenizer, tmp_path):
    """Why the GPU configs load float32 weights and train with bf16 autocast: AdamW's first step moves every weight
    by about the learning rate, which float32 keeps and bfloat16 (8 bits of mantissa) rounds away."""
    assert _fraction_changed_by_a_tiny_update(tiny_checkpoint, tiny_tokenizer, tmp_path / "a", torch.float32) > 0.95
    assert _fraction_changed_by_a_tiny_update(tiny_checkpoint, tiny_tokenizer, tmp_path / "b", torch.bfloat16) < 0.2


def test_fsdp1_is_refused_with_what_to_use_instead():
    from types import SimpleNamespace

    from echogen_rl.models.sharding import prepare_sharding

    prepare_sharding(SimpleNamespace(is_fsdp_enabled=False))
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1))
    trainer = SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=state))
    with pytest.raises(ValueError, match=r"supports FSDP2 only \(fsdp_version: 2.*fsdp.yaml"):
        prepare_sharding(trainer)


def test_an_fsdp_config_on_cpu_processes_warns_that_it_runs_plain_data_parallelism(
    tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch
):
    """On CPU processes accelerate silently replaces a DeepSpeed (or FSDP) config by plain data parallelism."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trainer("pmtp", tiny_checkpoint, tiny_tokenizer, tmp_path)  # nothing asked: no warning
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr("accelerate.Accelerator.distributed_type", DistributedType.MULTI_CPU)
    with pytest.warns(UserWarning, match="asks for FSDP, but on CPU processes accelerate runs plain data"):
        _trainer("pmtp", tiny_checkpoint, tiny_tokenizer, tmp_path)
