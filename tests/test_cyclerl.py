import inspect

import pytest
import torch
from peft import LoraConfig
from trl import GRPOTrainer

from echogen_rl.data.random_layouts import build_random_layout_dataset
from echogen_rl.data.shapes import phrase_pool
from echogen_rl.layout import Layout
from echogen_rl.models.loading import DEFAULT_LORA_TARGETS
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer


@pytest.fixture(scope="module")
def prompts_ds():
    return build_random_layout_dataset(16, 0, phrase_pool(), grid_size=8)


def _config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=8,
        num_generations=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        beta=0.0,
        grounding_model="policy",  # no reference without PEFT or beta; tests that need one say so
        seed=0,
    )
    return CycleRLConfig(**{**base, **kw})


def test_grpo_hooks_we_override_still_exist():
    """TRL's trainer internals are private: pin what CycleRLTrainer relies on."""
    assert list(inspect.signature(GRPOTrainer._generate).parameters) == ["self", "prompts"]
    source = inspect.getsource(GRPOTrainer._generate)
    assert (
        "return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images"
        in source
    )
    params = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters
    assert list(params)[:8] == [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy", "compute_aux_loss"
    ]  # fmt: skip
    scoring = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "= self._generate(prompts)" in scoring
    assert "inp[key] = values[i]" in scoring  # extra fields reach the reward kwargs
    assert "self._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in scoring
    assert "_compute_loss" in inspect.getsource(GRPOTrainer.compute_loss)


def _rollout_and_recompute(trainer, prompts):
    trainer._ensure_engines()
    prompt_ids, codes, _, _, logprobs, extra, _, _ = trainer._generate(prompts)
    batch = pad_segments([trainer.layout_prompts.l2i_prompt(t) for t in extra["target_layouts"]], 2, "left")
    assert [row[row != 2].tolist() for row in batch["input_ids"]] == prompt_ids
    codes = torch.tensor(codes)
    ids = torch.cat([batch["input_ids"], codes], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(codes)], dim=1)
    recomputed, entropy, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, mask, codes.shape[1], compute_entropy=True
    )
    return torch.tensor(logprobs), recomputed.detach(), entropy


@pytest.mark.parametrize("mode,guidance", [("cfg", 5.0), ("cond", 1.0), ("cfg", 1.0)])
def test_loss_logprobs_equal_rollout_logprobs(tiny_model, tiny_tokenizer, prompts_ds, tmp_path, mode, guidance):
    """On-policy: the loss's log-probs of the sampled codes are the engine's (ratio 1 at the first iteration)."""
    args = _config(tmp_path, logprob_mode=mode, guidance_scale=guidance, top_k=5, temperature=0.9)
    trainer = CycleRLTrainer(
        tiny_model, ["cycle_iou"], args, train_dataset=prompts_ds, processing_class=tiny_tokenizer
    )
    engine, recomputed, entropy = _rollout_and_recompute(trainer, prompts_ds["prompt"][:3])
    torch.testing.assert_close(recomputed, engine, atol=1e-5, rtol=0)
    assert (entropy >= 0).all() and torch.isfinite(entropy).all()


def test_cond_mode_reads_another_distribution_than_cfg_sampling(noisy_model, tiny_tokenizer, prompts_ds, tmp_path):
    args = _config(tmp_path, logprob_mode="cond", guidance_scale=5.0)
    trainer = CycleRLTrainer(
        noisy_model, ["cycle_iou"], args, train_dataset=prompts_ds, processing_class=tiny_tokenizer
    )
    engine, recomputed, _ = _rollout_and_recompute(trainer, prompts_ds["prompt"][:2])
    assert not torch.allclose(recomputed, engine, atol=1e-3)


def test_rewards_receive_layouts_and_codes(tiny_model, tiny_tokenizer, prompts_ds, tmp_path):
    seen = {}

    def spy(prompts, completions, target_layouts, recovered_layouts, image_codes, grounding_problems, layout, **kw):
        seen.update(n=len(prompts), targets=target_layouts, codes=image_codes, layout=layout)
        return [0.5] * len(prompts)

    trainer = CycleRLTrainer(
        tiny_model, [spy], _config(tmp_path, max_steps=1), train_dataset=prompts_ds, processing_class=tiny_tokenizer
    )
    trainer.train()
    assert seen["n"] == 8 and len(seen["codes"][0]) == 64
    # Each target a reward gets is the layout its row's prompt was written from (the row's JSON `layout` column,
    # another path than the prompt text the trainer parses).
    for target, source in zip(seen["targets"], seen["layout"], strict=True):
        written = Layout.from_json(source)
        assert target.phrases == written.phrases and target.caption == written.caption
        for got, want in zip(target.entities, written.entities, strict=True):
            assert got.box == pytest.approx(want.box, abs=1e-6)
    assert isinstance(seen["layout"][0], str)  # dataset columns come along


def test_grpo_steps_change_lora_parameters_and_log_finite_rewards(tiny_model, tiny_tokenizer, prompts_ds, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS)
    args = _config(tmp_path, max_steps=3, beta=0.04, grounding_model="reference")  # the disabled adapter
    # An untrained grounder earns cycle rewards of 0 everywhere (no advantage); box_fill varies between images.
    funcs = ["cycle_iou", "grounding_format", "rewards/custom_reward.py:box_fill"]
    trainer = CycleRLTrainer(
        tiny_model, funcs, args, train_dataset=prompts_ds, processing_class=tiny_tokenizer, peft_config=lora
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert changed
    logs = [h for h in trainer.state.log_history if "cycle_miou" in h]
    assert any(h["reward_std"] > 0 for h in logs)
    for key in (
        "rewards/cycle_iou/mean",
        "rewards/box_fill/mean",
        "cycle_miou",
        "grounding/parse_failure_rate",
        "grounding/problem_rate",
        "rollout/images_per_second",
        "kl",
    ):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in logs), key


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_raises_a_reward_the_policy_can_learn(tiny_model, tiny_tokenizer, prompts_ds, tmp_path, beta):
    """The whole loop (rollout, reward, advantage, image log-probs, LoRA update) climbs a reward's gradient: asked
    for background codes, the policy draws more of them, whether or not a small KL term holds it to the base."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS)
    args = _config(tmp_path, max_steps=8, learning_rate=2e-2, beta=beta, temperature=1.0)
    trainer = CycleRLTrainer(
        tiny_model,
        ["echogen_rl.rewards.controls:background_share"],
        args,
        train_dataset=prompts_ds,
        processing_class=tiny_tokenizer,
        peft_config=lora,
    )
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    chance = 1 / tiny_model.config.vq_config.num_embeddings
    assert rewards[0] < 2 * chance  # the untrained policy draws codes about uniformly
    assert sum(rewards[-3:]) / 3 > 0.5, rewards


def test_full_finetuning_without_lora(tiny_model, tiny_tokenizer, prompts_ds, tmp_path):
    with pytest.raises(ValueError, match="grounding_model='reference' needs a reference"):
        CycleRLTrainer(
            tiny_model,
            ["cycle_iou"],
            _config(tmp_path, grounding_model="reference"),
            train_dataset=prompts_ds,
            processing_class=tiny_tokenizer,
        )
    args = _config(tmp_path, max_steps=2, grounding_model="policy")
    funcs = ["rewards/custom_reward.py:box_fill"]
    trainer = CycleRLTrainer(tiny_model, funcs, args, train_dataset=prompts_ds, processing_class=tiny_tokenizer)
    head = tiny_model.model.generation_head.vision_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(head, tiny_model.model.generation_head.vision_head.weight)


def test_reference_grounding_uses_the_disabled_adapter(noisy_model, tiny_tokenizer, prompts_ds, tmp_path):
    from echogen_rl.models.grounding import Grounder

    codes = torch.randint(0, 9, (3, 64), generator=torch.Generator().manual_seed(0))
    phrases = [["red circle"], ["blue square", "red square"], ["white triangle"]]
    base = [r.text for r in Grounder(noisy_model, PromptBuilder(tiny_tokenizer, 64))(codes, phrases)]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS)
    args = _config(tmp_path, grounding_model="reference")
    trainer = CycleRLTrainer(
        noisy_model, ["cycle_iou"], args, train_dataset=prompts_ds, processing_class=tiny_tokenizer, peft_config=lora
    )
    with torch.no_grad():  # move the policy away from the base model
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trainer._ensure_engines()
    assert [r.text for r in trainer._ground(codes, phrases)] == base
    trainer.args.grounding_model = "policy"
    assert [r.text for r in trainer._ground(codes, phrases)] != base


def test_bad_reward_length_and_bad_config_are_named(tiny_model, tiny_tokenizer, prompts_ds, tmp_path):
    def short(prompts, completions, **kw):
        return [1.0]

    trainer = CycleRLTrainer(
        tiny_model, [short], _config(tmp_path, max_steps=1), train_dataset=prompts_ds, processing_class=tiny_tokenizer
    )
    with pytest.raises(ValueError, match="The reward function 'short' returned 1 rewards"):
        trainer.train()
    with pytest.raises(ValueError, match="logprob_mode"):
        _config(tmp_path, logprob_mode="both")
    with pytest.raises(ValueError, match="use_vllm"):
        _config(tmp_path, use_vllm=True)
    with pytest.raises(ValueError, match="prompt"):
        CycleRLTrainer(
            tiny_model,
            ["cycle_iou"],
            _config(tmp_path),
            train_dataset=prompts_ds.remove_columns(["prompt"]),
            processing_class=tiny_tokenizer,
        )


def test_vllm_engine_without_vllm_says_how_to_install(tiny_model, tiny_tokenizer, prompts_ds, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    args = _config(tmp_path, rollout_engine="vllm")
    with pytest.raises(ImportError, match=r"rollout_engine='vllm' needs vLLM: .*make install-vllm") as err:
        CycleRLTrainer(tiny_model, ["cycle_iou"], args, train_dataset=prompts_ds, processing_class=tiny_tokenizer)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="vllm_kv_cache_gib must be > 0"):
        _config(tmp_path, rollout_engine="vllm", vllm_kv_cache_gib=0)
