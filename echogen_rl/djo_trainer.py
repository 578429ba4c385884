"""Stage 2, DJO: layout -> image -> layout, the loop closed through Gumbel-Softmax image tokens.

For each sample, a teacher-forced L2I forward gives the image logits `z_t` at all N image positions;
`y_t = GumbelSoftmax(z_t, tau)` (straight-through hard by default) enters an I2L forward as the soft tokens
`e_t = generation_aligner(y_t @ generation_embeddings.weight)`, and the I2L answer's cross-entropy is `L_loop`.
The objective is `J = L_L2I + lambda * L_loop`, so `L_loop` trains the L2I path through the soft tokens too.

The image logits come from one teacher-forced pass over the true codes, not from the model's own rollout:
`z_t` is conditioned on the true codes before `t`, not on sampled ones. A differentiable rollout would take N
sequential forwards (576 for Janus-Pro) with all their graphs kept for the backward; one teacher-forced pass
is its practical approximation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from trl import SFTTrainer

from .collators import AbsentPhrases, LoopLossCollator, dataset_phrases, training_columns
from .djo_config import DJOConfig
from .modeling import (
    TargetLoss,
    check_sharding,
    freeze_untrained,
    image_logits,
    masked_cross_entropy,
    mixed_forward,
    soft_code_embeddings,
    unwrap_janus,
)
from .observe import attach_sample_logging
from .prompts import IGNORE_INDEX, PromptBuilder


def gumbel_tau(step: int, start: float, end: float, anneal_steps: int, schedule: str = "exponential") -> float:
    """The Gumbel-Softmax temperature at `step`.

    Args:
        anneal_steps (`int`): steps from `start` to `end` (exponential schedule); `end` holds afterwards.
        schedule (`str`, *optional*, defaults to `"exponential"`): `"exponential"`, i.e.
            `start * (end / start) ** min(step / anneal_steps, 1)`, or `"constant"` (`start` throughout).
    """
    if schedule == "constant":
        return start
    if schedule != "exponential":
        raise ValueError(f"schedule must be 'exponential' or 'constant', got {schedule!r}")
    return start * (end / start) ** min(step / max(anneal_steps, 1), 1.0)


def warmup_loop_weight(step: int, loop_weight: float, warmup_steps: int) -> float:
    """`lambda` at `step`: rises linearly from 0 to `loop_weight` over `warmup_steps` (none when 0)."""
    if warmup_steps <= 0:
        return loop_weight
    return loop_weight * min(step / warmup_steps, 1.0)


def soft_image_tokens(
    model: torch.nn.Module, logits: torch.Tensor, tau: float, straight_through: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-Softmax samples `y` [..., V] of image-code logits and their embeddings `e` [..., H].

    Args:
        logits (`torch.Tensor` of shape `[..., V]`): image-code logits.
        tau (`float`): the Gumbel-Softmax temperature.
        straight_through (`bool`, *optional*, defaults to `True`): `y` is one-hot in the forward pass (so `e`
            equals the embedding of a real code) with the soft sample's gradient; `False`: `y` is the soft sample.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `y`, and `e = generation_aligner(y @ generation_embeddings.weight)`.
    """
    y = F.gumbel_softmax(logits.float(), tau=tau, hard=straight_through, dim=-1)
    return y, soft_code_embeddings(model, y)


class DJOLosses(NamedTuple):
    """The DJO objective `loss` = `l2i.loss + loop_weight * loop.loss`, and its two parts."""

    loss: torch.Tensor
    l2i: TargetLoss
    loop: TargetLoss


def djo_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    tau: float,
    straight_through: bool = True,
    loop_weight: float = 1.0,
) -> DJOLosses:
    """The DJO losses of a batch from `LoopLossCollator`.

    Args:
        batch (`dict[str, torch.Tensor]`): the `l2i_*` and `i2l_*` tensors of `LoopLossCollator`.
        tau (`float`): the Gumbel-Softmax temperature.
        straight_through (`bool`, *optional*, defaults to `True`): see `soft_image_tokens`.
        loop_weight (`float`, *optional*, defaults to `1.0`): `lambda`.

    Returns:
        `DJOLosses`: `J`, the L2I image-token cross-entropy and the I2L answer cross-entropy on the soft tokens.
    """
    labels = batch["l2i_image_labels"]
    select = labels != IGNORE_INDEX
    # Each sample's N image labels and its N I2L image positions pair up in row-major order.
    if not torch.equal(select.sum(1), batch["i2l_image_mask"].sum(1)):
        raise ValueError("each sample needs as many L2I image labels as I2L image positions")
    hidden = mixed_forward(model, batch["l2i_input_ids"], batch["l2i_image_mask"], batch["l2i_attention_mask"])
    logits = image_logits(model, hidden[select]).float()  # [B * N, V]
    targets = labels[select]
    accuracy = (logits.detach().argmax(-1) == targets).float().mean().item() if len(targets) else 0.0
    l2i = TargetLoss(F.cross_entropy(logits, targets), len(targets), accuracy)

    _, soft = soft_image_tokens(model, logits, tau, straight_through)
    hidden = mixed_forward(
        model, batch["i2l_input_ids"], batch["i2l_image_mask"], batch["i2l_attention_mask"], image_embeds=soft
    )
    loop = masked_cross_entropy(model, hidden, batch["i2l_text_labels"], "text")
    return DJOLosses(l2i.loss + loop_weight * loop.loss, l2i, loop)


class DJOTrainer(SFTTrainer):
    """Trainer for Stage 2, DJO.

    The changes w.r.t. [`~trl.SFTTrainer`] are the data collator ([`LoopLossCollator`]: dataset preparation is
    skipped, rows are built from `caption` / `layout` / `image_codes`) and two hooks: `compute_loss` (the DJO
    objective, see [`djo_losses`], with `tau` and `lambda` scheduled by the optimizer step) and `log` (adds the
    `tau` and `lambda` of the latest step). Everything else (optimizer, PEFT, accelerate, checkpointing) is
    inherited.

    Args:
        model (`JanusForConditionalGeneration` or `PeftModel`): the model, usually a PMTP checkpoint.
        args (`DJOConfig`): the configuration.
        train_dataset (`datasets.Dataset`): columns `caption`, `layout` (JSON), `image_codes`.
        eval_dataset (`datasets.Dataset`, *optional*): same columns.
        processing_class (`PreTrainedTokenizerBase`): the model's tokenizer.
        peft_config (`peft.PeftConfig`, *optional*): wrap the model with this adapter.
    """

    _tag_names = ["trl", "sft", "echogen-rl", "djo"]

    def __init__(self, model, args: DJOConfig, train_dataset, eval_dataset=None, processing_class=None, **kwargs):
        if processing_class is None:
            raise ValueError("DJOTrainer needs the model's tokenizer as `processing_class`")
        if len(train_dataset) == 0:
            raise ValueError("DJOTrainer: the training dataset is empty")
        # Training reads only the codes; an `image` column would also make TRL treat the data as a VLM dataset.
        train_dataset = training_columns(train_dataset)
        if eval_dataset is not None:
            eval_dataset = training_columns(eval_dataset)
        freeze_untrained(model)
        prompts = PromptBuilder(processing_class, unwrap_janus(model).config.vision_config.num_image_tokens)
        absent = (
            AbsentPhrases(args.absent_phrase_prob, dataset_phrases(train_dataset)) if args.absent_phrase_prob else None
        )
        kwargs.setdefault("data_collator", LoopLossCollator(prompts, args.max_length, absent))
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
        self._last_schedule: dict[str, float] = {}

    def schedule(self) -> dict[str, float]:
        """`tau` and `loop_weight` (lambda) at the current optimizer step."""
        step, args = self.state.global_step, self.args
        anneal_steps = args.tau_anneal_steps or self.state.max_steps
        return {
            "tau": gumbel_tau(step, args.gumbel_tau_start, args.gumbel_tau_end, anneal_steps, args.tau_schedule),
            "loop_weight": warmup_loop_weight(step, args.loop_weight, args.loop_weight_warmup_steps),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        schedule = self.schedule()
        out = djo_losses(model, inputs, schedule["tau"], self.args.straight_through, schedule["loop_weight"])
        metrics = self._metrics[mode]
        for task, part in (("l2i", out.l2i), ("loop", out.loop)):
            metrics[f"loss_{task}"].append(self.accelerator.gather_for_metrics(part.loss.detach()).mean().item())
            metrics[f"accuracy_{task}"].append(part.accuracy)
        if mode == "train":
            self._last_schedule = schedule
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # tau and lambda change every step: log the values the latest step used, not a mean over the window.
        if "loss" in logs:
            logs.update(self._last_schedule)
        super().log(logs, start_time)
