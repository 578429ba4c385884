"""Stage 3, CycleRL: GRPO on generated images, rewarded by how well the model grounds its own image.

    accelerate launch recipes/cyclerl.py --config recipes/configs/cyclerl/shapes_tiny.yaml

Rewards are chosen by name in the YAML (`reward_funcs`, `reward_weights`); your own as
`package.module:function` or `path/to/file.py:function` (see rewards/custom_reward.py).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback, set_seed

from echogen_rl.data.random_layouts import add_prompt_column, build_random_layout_dataset
from echogen_rl.data.shapes import phrase_pool
from echogen_rl.data.sources import CycleRLDataArguments, build_layout_datasets
from echogen_rl.models.loading import JanusModelConfig, load_janus, lora_config_from, require_start_checkpoint
from echogen_rl.scripts.runner import RecipeParser
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer


def main(
    script_args: CycleRLDataArguments,
    training_args: CycleRLConfig,
    model_args: JanusModelConfig,
    callbacks: list[TrainerCallback] | None = None,
) -> CycleRLTrainer:
    set_seed(training_args.seed)
    require_start_checkpoint(model_args.model_name_or_path, Path(__file__).parent / "djo.py")
    with training_args.main_process_first(desc="checkpoint and prompts"):
        model, tokenizer = load_janus(
            model_args.model_name_or_path,
            model_args.dtype,
            model_args.attn_implementation,
            model_args.build_tiny_if_missing,
        )
        if script_args.prompt_source == "random":
            phrases = script_args.phrase_pool or phrase_pool()
            train_dataset = build_random_layout_dataset(
                script_args.num_random_prompts, training_args.seed, phrases, **script_args.random_layout_kwargs()
            )
            eval_dataset = None
        else:  # prompts are layouts: no image is read or encoded
            train, evals, _ = build_layout_datasets(script_args, encode=False)
            train_dataset, eval_dataset = add_prompt_column(train), evals and add_prompt_column(evals)

    trainer = CycleRLTrainer(
        model,
        reward_funcs=training_args.reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config_from(model_args),
        callbacks=callbacks,
        shapes_world=script_args.shapes_config() if script_args.dataset == "shapes" else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json beside the model: `echogen-rl plot` reads its curves
    return trainer


def make_parser() -> RecipeParser:
    """The parser of this stage's arguments: `--config file.yaml` plus any field on the command line."""
    return RecipeParser((CycleRLDataArguments, CycleRLConfig, JanusModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
