"""What PMTP's and DJO's trainers share: an `SFTTrainer` whose rows are built by a layout collator from `caption`,
`layout` and `image_codes`, with the same checks, freezing, sharding check, sample logging and loss metrics."""

from __future__ import annotations

from trl import SFTTrainer

from echogen_rl.data.collators import AbsentPhrases, dataset_phrases, training_columns
from echogen_rl.models.modeling import TargetLoss, freeze_untrained, unwrap_janus
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.sharding import prepare_sharding, save_fsdp2_model
from echogen_rl.trainer.callbacks import attach_sample_logging


class LayoutSFTTrainer(SFTTrainer):
    """The base of [`PMTPTrainer`] and [`DJOTrainer`]: dataset preparation is skipped (the collator that
    [`prepare_stage`] returns builds the rows), the model's untrained parts are frozen, and the loss is a mean per
    micro-batch. Subclasses implement `prepare_stage` and `compute_loss`.

    Args:
        model (`JanusForConditionalGeneration` or `PeftModel`): the model.
        args (`PMTPConfig` or `DJOConfig`): the configuration.
        train_dataset (`datasets.Dataset`): columns `caption`, `layout` (JSON), `image_codes`.
        eval_dataset (`datasets.Dataset`, *optional*): same columns.
        processing_class (`PreTrainedTokenizerBase`): the model's tokenizer.
        peft_config (`peft.PeftConfig`, *optional*): wrap the model with this adapter.
    """

    def __init__(self, model, args, train_dataset, eval_dataset=None, processing_class=None, **kwargs):
        name = type(self).__name__
        if processing_class is None:
            raise ValueError(f"{name} needs the model's tokenizer as `processing_class`")
        if len(train_dataset) == 0:
            raise ValueError(f"{name}: the training dataset is empty")
        # Training reads only the codes; an `image` column would also make TRL treat the data as a VLM dataset.
        train_dataset = training_columns(train_dataset)
        if eval_dataset is not None:
            eval_dataset = training_columns(eval_dataset)
        freeze_untrained(model)
        prompts = PromptBuilder(processing_class, unwrap_janus(model).config.vision_config.num_image_tokens)
        collator = self.prepare_stage(model, args, prompts, train_dataset, processing_class)
        kwargs.setdefault("data_collator", collator)
        super().__init__(
            model,
            args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # The loss is a mean per micro-batch, so the Trainer must divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        prepare_sharding(self)
        attach_sample_logging(self, (eval_dataset, train_dataset))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """As `Trainer.save_model`; under FSDP2 the final save writes the whole weights ([`save_fsdp2_model`]),
        while each checkpoint keeps the shards for resuming."""
        if _internal_call or not save_fsdp2_model(self, output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)

    def prepare_stage(self, model, args, prompts: PromptBuilder, train_dataset, processing_class):
        """Everything the stage sets up before the `SFTTrainer` exists; returns its data collator."""
        raise NotImplementedError

    @staticmethod
    def absent_phrases(args, train_dataset) -> AbsentPhrases | None:
        """The "not present" queries of `args.absent_phrase_prob`, drawn from the dataset's phrases."""
        if not args.absent_phrase_prob:
            return None
        return AbsentPhrases(args.absent_phrase_prob, dataset_phrases(train_dataset))

    def log_losses(self, mode: str, parts: dict[str, TargetLoss | None], skip_empty: bool = True) -> None:
        """Records `loss_<task>` (averaged over processes) and `accuracy_<task>` of each part (with `skip_empty`,
        of each part that has targets)."""
        metrics = self._metrics[mode]
        for task, part in parts.items():
            if part is None or (skip_empty and part.count == 0):
                continue
            metrics[f"loss_{task}"].append(self.accelerator.gather_for_metrics(part.loss.detach()).mean().item())
            metrics[f"accuracy_{task}"].append(part.accuracy)
