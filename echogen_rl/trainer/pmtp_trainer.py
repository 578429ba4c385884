"""Stage 1, PMTP: both tasks in one packed sequence with a task-aware (block-diagonal causal) mask."""

from __future__ import annotations

import time

import torch

from echogen_rl.data.collators import PMTPCollator, dataset_phrases
from echogen_rl.data.kind_negatives import KindNegatives
from echogen_rl.data.shapes import is_shapes_phrase
from echogen_rl.models.modeling import (
    TargetLoss,
    block_causal_mask,
    masked_cross_entropy,
    mixed_forward,
    unwrap_janus,
)
from echogen_rl.models.sampling import record_sampling
from echogen_rl.trainer.layout_sft import LayoutSFTTrainer
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


class PMTPTrainer(LayoutSFTTrainer):
    """Trainer for Stage 1, PMTP.

    The changes w.r.t. [`~trl.SFTTrainer`] are the data collator ([`PMTPCollator`]: dataset preparation is
    skipped, rows are built from `caption` / `layout` / `image_codes`) and `compute_loss`. Everything else
    (optimizer, PEFT, accelerate, checkpointing, logging) is inherited. Arguments: see [`LayoutSFTTrainer`]
    (`args` is a [`PMTPConfig`]).
    """

    _tag_names = ["trl", "sft", "echogen-rl", "pmtp"]

    def __init__(self, model, args: PMTPConfig, train_dataset, eval_dataset=None, processing_class=None, **kwargs):
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, **kwargs)
        self._tokens = {"train": 0, "eval": 0}
        self._clock = {"train": time.perf_counter(), "eval": time.perf_counter()}

    def prepare_stage(self, model, args: PMTPConfig, prompts, train_dataset, processing_class) -> PMTPCollator:
        # A task with weight 0 is not built at all: a single-task run does not pay for the other segment.
        tasks = tuple(t for t, w in (("l2i", args.image_loss_weight), ("i2l", args.text_loss_weight)) if w > 0)
        kinds = None
        if args.kind_negative_prob or args.color_negative_prob:
            if not any(is_shapes_phrase(p) for p in dataset_phrases(train_dataset, limit=1000)):
                name = "kind_negative_prob" if args.kind_negative_prob else "color_negative_prob"
                raise ValueError(
                    f"PMTPConfig.{name} needs shapes-world phrases ('<color> <kind>'); the training "
                    "dataset has none (set it to 0 for other datasets)"
                )
            kinds = KindNegatives(args.kind_negative_prob, colors=args.color_negative_prob)
        absent = self.absent_phrases(args, train_dataset)
        collator = PMTPCollator(
            prompts,
            args.max_length,
            args.pack_segments,
            args.uncond_prob,
            tasks,
            absent,
            kinds,
            shuffle_queries=args.shuffle_grounding_queries,
        )
        if args.uncond_prob > 0 and "l2i" in tasks:
            record_sampling(model, unconditional_branch=True)  # saved with every checkpoint: CFG works from here
        return collator

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        out = pmtp_losses(model, inputs, self.args.segment_attention)
        loss = self.args.image_loss_weight * out["img"].loss + self.args.text_loss_weight * out["text"].loss
        self.log_losses(mode, out, skip_empty=False)
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
