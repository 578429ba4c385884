"""Each checkpoint records how it is sampled; commands and CycleRL default to the record, and warn on a bad CFG."""

import warnings

import pytest
from transformers import GenerationConfig, JanusForConditionalGeneration

from echogen_rl.data.random_layouts import build_random_layout_dataset
from echogen_rl.data.shapes import build_shapes_dataset, phrase_pool
from echogen_rl.models.sampling import (
    has_unconditional_branch,
    record_sampling,
    resolve_guidance_scale,
    resolve_temperature,
)
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer


def test_the_tiny_checkpoint_records_no_cfg_and_a_cfg_scale_on_it_warns(tiny_model):
    assert not has_unconditional_branch(tiny_model)
    assert resolve_guidance_scale(tiny_model, None, "generate --guidance-scale") == 1.0
    with pytest.warns(UserWarning, match=r"generate --guidance-scale: guidance scale 5 on a model trained without"):
        assert resolve_guidance_scale(tiny_model, 5.0, "generate --guidance-scale") == 5.0  # an explicit flag wins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_guidance_scale(tiny_model, 1.0, "eval") == 1.0
    with pytest.raises(ValueError, match="eval: guidance scale must be >= 0"):
        resolve_guidance_scale(tiny_model, -1.0, "eval")
    assert resolve_temperature(tiny_model, None) == 1.0 and resolve_temperature(tiny_model, 0.0) == 0.0


def test_a_checkpoint_without_the_record_is_taken_as_janus_pro(tiny_model):
    """Janus-Pro as published says nothing about the branch and CFG 5: both are trusted, with no warning."""
    tiny_model.generation_config = GenerationConfig(guidance_scale=5.0)
    assert has_unconditional_branch(tiny_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_guidance_scale(tiny_model, None, "eval") == 5.0


def _pmtp(model, tokenizer, tmp_path, uncond_prob):
    args = PMTPConfig(
        output_dir=str(tmp_path), uncond_prob=uncond_prob, max_steps=1, report_to=[], use_cpu=True, bf16=False
    )
    return PMTPTrainer(model, args, train_dataset=build_shapes_dataset(8, seed=0), processing_class=tokenizer)


@pytest.mark.parametrize("uncond_prob,branch,scale", [(0.0, False, 1.0), (0.2, True, 5.0)])
def test_pmtp_saves_how_its_model_is_sampled(tiny_model, tiny_tokenizer, tmp_path, uncond_prob, branch, scale):
    trainer = _pmtp(tiny_model, tiny_tokenizer, tmp_path / "run", uncond_prob)
    trainer.save_model(str(tmp_path / "saved"))
    saved = JanusForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert saved.generation_config.unconditional_branch is branch
    assert resolve_guidance_scale(saved, None, "eval") == scale


def test_recording_keeps_a_scale_above_one_and_drops_it_without_a_branch(tiny_model):
    tiny_model.generation_config.sampling_guidance_scale = 3.0
    record_sampling(tiny_model, unconditional_branch=True)
    assert tiny_model.generation_config.sampling_guidance_scale == 3.0
    record_sampling(tiny_model, unconditional_branch=False)
    assert tiny_model.generation_config.sampling_guidance_scale == 1.0
    assert tiny_model.generation_config.guidance_scale == 5.0  # transformers' own, for its image generate


def test_cyclerl_rollouts_default_to_the_recorded_scale(tiny_model, tiny_tokenizer, tmp_path):
    prompts = build_random_layout_dataset(8, 0, phrase_pool(), grid_size=8)
    common = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, report_to=[], use_cpu=True
    )
    common.update(bf16=False, beta=0.0, grounding_model="policy")
    trainer = CycleRLTrainer(
        tiny_model, ["cycle_iou"], CycleRLConfig(**common), train_dataset=prompts, processing_class=tiny_tokenizer
    )
    assert trainer.args.guidance_scale == 1.0
    with pytest.warns(UserWarning, match="CycleRLConfig.guidance_scale: guidance scale 5"):
        CycleRLTrainer(
            tiny_model,
            ["cycle_iou"],
            CycleRLConfig(**common, guidance_scale=5.0),
            train_dataset=prompts,
            processing_class=tiny_tokenizer,
        )
