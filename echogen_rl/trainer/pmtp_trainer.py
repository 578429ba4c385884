"""Stage 1, PMTP: both tasks in one packed sequence with a task-aware (block-diagonal causal) mask."""

from __future__ import annotations

import time

import torch
from trl import SFTTrainer

from echogen_rl.data.collators import AbsentPhrases, PMTPCollator, dataset_phrases, training_columns
from echogen_rl.data.kind_negatives import KindNegatives
from echogen_rl.data.shapes import is_shapes_phrase
from echogen_rl.models.modeling import (
    TargetLoss,
    block_causal_mask,
    check_sharding,
    freeze_untrained,
    masked_cross_entropy,
    mixed_forward,
    unwrap_janus,
)
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.sampling import record_sampling
from echogen_rl.trainer.callbacks import attach_sample_logging
from echogen_rl.trainer.pmtp_config import PMTPConfig


def pmtp_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], segment_attention: bool = True
) -> dict[str, TargetLoss]:
    """The two PMTP losses of a packed batch from `PMTPCollator`: `{"img": TargetLoss, "text": TargetLoss}`.

    Args:
        segment_attention (`bool`, *optional*, defaults to `True`): attend within each segment by gathering
            it (varlen attention); `False` builds the dense block-diagonal 4D mask over each row instead.
    """
    if segment_attention:
        kwargs = {"segment_ids": batch["segment_ids"]}
    else:
        kwargs = {"attention_mask": block_causal_mask(batch["segment_ids"], dtype=unwrap_janus(model).dtype)}
    hidden = mixed_forward(
        model, batch["input_ids"], batch["image_mask"], position_ids=batch["position_ids"], **kwargs
    )
    return {
        "img": masked_cross_entropy(model, hidden, batch["image_labels"], "image"),
        "text": masked_cross_entropy(model, hidden, batch["text_labels"], "text"),
    }


class PMTPTrainer(SFTTrainer):
    """Trainer for Stage 1, PMTP.

    The changes w.r.t. [`~trl.SFTTrainer`] are the data collator ([`PMTPCollator`]: dataset preparation is
    skipped, rows are built from `caption` / `layout` / `image_codes`) and `compute_loss`. Everything else
    (optimizer, PEFT, accelerate, checkpointing, logging) is inherited.

    Args:
        model (`JanusForConditionalGeneration` or `PeftModel`): the model.
        args (`PMTPConfig`): the configuration.
        train_dataset (`datasets.Dataset`): columns `caption`, `layout` (JSON), `image_codes`.
        eval_dataset (`datasets.Dataset`, *optional*): same columns.
        processing_class (`PreTrainedTokenizerBase`): the model's tokenizer.
        peft_config (`peft.PeftConfig`, *optional*): wrap the model with this adapter.
    """

    _tag_names = ["trl", "sft", "echogen-rl", "pmtp"]

    def __init__(self, model, args: PMTPConfig, train_dataset, eval_dataset=None, processing_class=None, **kwargs):
        if processing_class is None:
            raise ValueError("PMTPTrainer needs the model's tokenizer as `processing_class`")
        if len(train_dataset) == 0:
            raise ValueError("PMTPTrainer: the training dataset is empty")
        # Training reads only the codes; an `image` column would also make TRL treat the data as a VLM dataset.
        train_dataset = training_columns(train_dataset)
        if eval_dataset is not None:
            eval_dataset = training_columns(eval_dataset)
        freeze_untrained(model)
        prompts = PromptBuilder(processing_class, unwrap_janus(model).config.vision_config.num_image_tokens)
        # A task with weight 0 is not built at all: a single-task run does not pay for the other segment.
        tasks = tuple(t for t, w in (("l2i", args.image_loss_weight), ("i2l", args.text_loss_weight)) if w > 0)
        absent = (
            AbsentPhrases(args.absent_phrase_prob, dataset_phrases(train_dataset)) if args.absent_phrase_prob else None
        )
        kinds = None
        if args.kind_negative_prob:
            if not any(is_shapes_phrase(p) for p in dataset_phrases(train_dataset, limit=1000)):
                raise ValueError(
                    "PMTPConfig.kind_negative_prob needs shapes-world phrases ('<color> <kind>'); the training "
                    "dataset has none (set it to 0 for other datasets)"
                )
            kinds = KindNegatives(args.kind_negative_prob)
        collator = PMTPCollator(prompts, args.max_length, args.pack_segments, args.uncond_prob, tasks, absent, kinds)
        if args.uncond_prob > 0 and "l2i" in tasks:
            record_sampling(model, unconditional_branch=True)  # saved with every checkpoint: CFG works from here
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
        check_sharding(self)
        attach_sample_logging(self, (eval_dataset, train_dataset))
        self._tokens = {"train": 0, "eval": 0}
        self._clock = {"train": time.perf_counter(), "eval": time.perf_counter()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        out = pmtp_losses(model, inputs, self.args.segment_attention)
        loss = self.args.image_loss_weight * out["img"].loss + self.args.text_loss_weight * out["text"].loss
        metrics = self._metrics[mode]
        for task in ("img", "text"):
            metrics[f"loss_{task}"].append(self.accelerator.gather_for_metrics(out[task].loss.detach()).mean().item())
            metrics[f"accuracy_{task}"].append(out[task].accuracy)
        if mode == "eval" and self._tokens[mode] == 0:
            self._clock[mode] = time.perf_counter()  # evaluation time only, not the training since the last one
        self._tokens[mode] += int((inputs["segment_ids"] >= 0).sum()) * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        elapsed = time.perf_counter() - self._clock[mode]
        if self._tokens[mode] and elapsed > 0:
            self._metrics[mode]["tokens_per_second"].append(self._tokens[mode] / elapsed)
        self._tokens[mode], self._clock[mode] = 0, time.perf_counter()
        super().log(logs, start_time)
