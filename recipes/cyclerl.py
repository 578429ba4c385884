"""Stage 3, CycleRL: GRPO on generated images, rewarded by how well the model grounds its own image.

    accelerate launch recipes/cyclerl.py --config recipes/configs/cyclerl/shapes_tiny.yaml

Rewards are chosen by name in the YAML (`reward_funcs`, `reward_weights`); your own as
`package.module:function` or `path/to/file.py:function` (see recipes/examples/custom_reward.py).
"""

from pathlib import Path

from transformers import set_seed

from echogen_rl.cyclerl_config import CycleRLConfig
from echogen_rl.cyclerl_trainer import CycleRLTrainer
from echogen_rl.data.random_layouts import add_prompt_column, build_random_layout_dataset
from echogen_rl.data.shapes import phrase_pool
from echogen_rl.data.sources import LayoutDataArguments, build_layout_datasets
from echogen_rl.loading import JanusModelConfig, load_janus, lora_config_from, require_start_checkpoint
from echogen_rl.recipe_runner import RecipeParser


def main(script_args: LayoutDataArguments, training_args: CycleRLConfig, model_args: JanusModelConfig):
    set_seed(training_args.seed)
    require_start_checkpoint(model_args.model_name_or_path, Path(__file__).parent / "djo.py")
    with training_args.main_process_first(desc="checkpoint and prompts"):
        model, tokenizer = load_janus(
            model_args.model_name_or_path,
            model_args.dtype,
            model_args.attn_implementation,
            model_args.build_tiny_if_missing,
        )
        if training_args.prompt_source == "random":
            phrases = training_args.phrase_pool or phrase_pool()
            layout_kwargs = dict(
                min_entities=training_args.random_min_entities,
                max_entities=training_args.random_max_entities,
                min_box_size=training_args.random_min_box_size,
                max_box_size=training_args.random_max_box_size,
                max_overlap=training_args.random_max_overlap,
                grid_size=training_args.random_box_grid,
            )
            train_dataset = build_random_layout_dataset(
                training_args.num_random_prompts, training_args.seed, phrases, **layout_kwargs
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
        shapes_world=script_args.shapes_config() if script_args.dataset == "shapes" else None,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json beside the model: `echogen-rl plot` reads its curves


if __name__ == "__main__":
    parser = RecipeParser((LayoutDataArguments, CycleRLConfig, JanusModelConfig))
    main(*parser.parse_args_and_config())
