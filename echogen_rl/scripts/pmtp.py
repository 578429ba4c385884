"""Stage 1, PMTP: layout-to-image and image-to-layout packed in one sequence with a task-aware mask.

    accelerate launch recipes/pmtp.py --config recipes/configs/pmtp/shapes_tiny.yaml
    accelerate launch recipes/pmtp.py --config recipes/configs/pmtp/shapes_tiny_kinds.yaml   # its second phase

Any field can be overridden on the command line, e.g. `--max_steps 50 --output_dir outputs/try`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback, set_seed

from echogen_rl.data.sources import LayoutDataArguments, build_layout_datasets, vq_tokenizer_for
from echogen_rl.models.loading import JanusModelConfig, load_janus, lora_config_from, require_start_checkpoint
from echogen_rl.scripts.runner import RecipeParser
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer


def main(
    script_args: LayoutDataArguments,
    training_args: PMTPConfig,
    model_args: JanusModelConfig,
    callbacks: list[TrainerCallback] | None = None,
) -> PMTPTrainer:
    if not model_args.build_tiny_if_missing:  # a second phase (shapes_tiny_kinds.yaml) starts from the first's output
        require_start_checkpoint(model_args.model_name_or_path, Path(__file__))
    set_seed(training_args.seed)
    with training_args.main_process_first(desc="checkpoint and data"):
        model, tokenizer = load_janus(
            model_args.model_name_or_path,
            model_args.dtype,
            model_args.attn_implementation,
            model_args.build_tiny_if_missing,
        )
        # Real images are encoded once by the model's VQ model, cached by its weights (shared by every stage).
        train_dataset, eval_dataset, _ = build_layout_datasets(script_args, vq_tokenizer_for(script_args, model))

    trainer = PMTPTrainer(
        model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=lora_config_from(model_args),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json beside the model: `echogen-rl plot` reads its curves
    return trainer


def make_parser() -> RecipeParser:
    """The parser of this stage's arguments: `--config file.yaml` plus any field on the command line."""
    return RecipeParser((LayoutDataArguments, PMTPConfig, JanusModelConfig))


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
