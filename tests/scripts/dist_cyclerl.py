"""CycleRL on two processes (tests/test_distributed.py): LoRA on the tiny checkpoint, random shapes layouts.

    ACCELERATE_USE_CPU=true python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/scripts/dist_cyclerl.py CHECKPOINT OUT_DIR

A group of `num_generations=4` images is split over the ranks (2 per rank): each rank records the rewards it
computed and the advantages it trained with, so the test can check that the group statistics span both ranks.
"""

from _dist import common_args, parse_args, trainable, write_rank
from peft import LoraConfig
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.random_layouts import build_random_layout_dataset
from echogen_rl.data.shapes import phrase_pool
from echogen_rl.models.loading import DEFAULT_LORA_TARGETS
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer

RECORD = {"prompts": [], "rewards": [], "advantages": []}


def mean_code(prompts, completions, image_codes, **kwargs):
    """A reward that differs between images (an untrained grounder's cycle reward is 0 everywhere)."""
    rewards = [sum(codes) / len(codes) for codes in image_codes]
    RECORD["prompts"].append(list(prompts))
    RECORD["rewards"].append(rewards)
    return rewards


class RecordingCycleRLTrainer(CycleRLTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        RECORD["advantages"].append(out["advantages"].tolist())
        return out


def build_trainer(trainer_cls, model, config, tokenizer, lora: bool):
    """The distributed tests' CycleRL trainer: the mean-code reward on 16 random shapes layouts, LoRA or full."""
    return trainer_cls(
        model,
        [mean_code],
        config,
        train_dataset=build_random_layout_dataset(16, 0, phrase_pool(), grid_size=8),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS) if lora else None,
    )


def main():
    args = parse_args()
    model = JanusForConditionalGeneration.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    config = CycleRLConfig(
        **common_args(args),
        per_device_train_batch_size=2,  # half a group per rank
        num_generations=4,
        beta=0.04,  # the reference is the disabled adapter
        grounding_model="reference",
        rollout_engine=args.rollout_engine,
        vllm_kv_cache_gib=0.05,
        vllm_enforce_eager=True,
    )
    trainer = build_trainer(RecordingCycleRLTrainer, model, config, tokenizer, lora=True)
    before = trainable(trainer.model)
    trainer.train()
    sync_count = getattr(trainer.rollout_engine, "sync_count", None)
    write_rank(
        trainer, args.out_dir, before, engine=type(trainer.rollout_engine).__name__, sync_count=sync_count, **RECORD
    )


if __name__ == "__main__":
    main()
