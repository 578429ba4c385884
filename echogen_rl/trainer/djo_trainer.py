"""Stage 2, DJO: layout -> image -> layout, the loop closed through Gumbel-Softmax image tokens.

For each sample, the loop's image tokens `y_t` (straight-through Gumbel-Softmax samples, one-hot forward) enter an
I2L forward as the soft tokens `e_t = generation_aligner(y_t @ generation_embeddings.weight)`, and the I2L answer's
cross-entropy is `L_loop`. The objective is `J = L_L2I + lambda * L_loop` (plus, optionally, the grounding loss on
the real image), so `L_loop` trains the L2I path through the soft tokens.

Where `y_t` comes from is `DJOConfig.loop_image` ([`echogen_rl.trainer.djo_loop`]): the model's own free-running sample
(`self_forced`, the default, or a differentiable `autoregressive` rollout), or the logits over the true codes
(`teacher_forced`, which shows the grounder the real image with a few changed cells: a comparison mode).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

from echogen_rl.data.collators import LoopLossCollator
from echogen_rl.data.kind_negatives import KindNegatives
from echogen_rl.models.modeling import (
    TargetLoss,
    image_logits,
    masked_cross_entropy,
    mixed_forward,
    soft_code_embeddings,
    unwrap_janus,
)
from echogen_rl.models.prompts import IGNORE_INDEX
from echogen_rl.models.sampling import resolve_guidance_scale
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.djo_loop import (
    LOOP_IMAGES,
    autoregressive_loop,
    autoregressive_memory_gib,
    gumbel_at,
    gumbel_softmax,
    sample_images,
    self_forced_logits,
)
from echogen_rl.trainer.layout_sft import LayoutSFTTrainer


def check_autoregressive_memory(janus, args: DJOConfig, prompt_length: int = 64) -> float:
    """The autoregressive loop's activation estimate (GiB, [`autoregressive_memory_gib`] at `prompt_length`
    prompt tokens); a clear error when it exceeds `args.loop_memory_limit_gib` or the device's memory."""
    import psutil

    text = janus.config.text_config
    n = janus.config.vision_config.num_image_tokens
    need = autoregressive_memory_gib(
        text.hidden_size, text.num_hidden_layers, prompt_length, n, args.per_device_train_batch_size
    )
    limit = args.loop_memory_limit_gib
    if limit is None:
        cuda = torch.cuda.is_available() and not args.use_cpu
        total = torch.cuda.get_device_properties(0).total_memory if cuda else psutil.virtual_memory().total
        limit = total / 2**30
    if need > limit:
        raise ValueError(
            f"DJOConfig.loop_image='autoregressive': {n} sequential forwards of batch "
            f"{args.per_device_train_batch_size} keep about {need:.1f} GiB of activations for the backward, more than "
            f"{limit:.1f} GiB; use loop_image='self_forced' (one pass over the model's own sample)"
        )
    return need


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
    model: torch.nn.Module,
    logits: torch.Tensor,
    tau: float,
    straight_through: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-Softmax samples `y` [..., V] of image-code logits and their embeddings `e` [..., H].

    Args:
        logits (`torch.Tensor` of shape `[..., V]`): image-code logits.
        tau (`float`): the Gumbel-Softmax temperature.
        straight_through (`bool`, *optional*, defaults to `True`): `y` is one-hot in the forward pass (so `e`
            equals the embedding of a real code) with the soft sample's gradient; `False`: `y` is the soft sample.
        generator (`torch.Generator`, *optional*): draws the Gumbel noise; the global generator when unset.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: `y`, and `e = generation_aligner(y @ generation_embeddings.weight)`.
    """
    y = gumbel_softmax(logits.float(), tau, straight_through, generator)
    return y, soft_code_embeddings(model, y)


class DJOLosses(NamedTuple):
    """The DJO objective `loss` = `l2i_weight * l2i + loop_weight * loop + i2l_weight * i2l`, and its parts."""

    loss: torch.Tensor
    l2i: TargetLoss
    loop: TargetLoss
    i2l: TargetLoss | None = None


def _no_loss(like: torch.Tensor) -> TargetLoss:
    return TargetLoss(like.sum() * 0.0, 0, 0.0)


def _check_loop_inputs(
    batch: dict[str, torch.Tensor], select: torch.Tensor, loop_image: str, special_ids: tuple[int, int, int] | None
) -> None:
    """Refuses a batch whose L2I image labels (`select`) and I2L image positions do not pair up, or a `loop_image`
    that is unknown or lacks the `special_ids` it needs."""
    # Each sample's N image labels and its N I2L image positions pair up in row-major order.
    if not torch.equal(select.sum(1), batch["i2l_image_mask"].sum(1)):
        raise ValueError("each sample needs as many L2I image labels as I2L image positions")
    if loop_image not in LOOP_IMAGES:
        raise ValueError(f"loop_image must be one of {LOOP_IMAGES}, got {loop_image!r}")
    if loop_image != "teacher_forced" and special_ids is None:
        raise ValueError(f"loop_image={loop_image!r} needs special_ids (BOS, <begin_of_image>, pad)")


def _l2i_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.LongTensor, select: torch.Tensor
) -> tuple[TargetLoss, torch.Tensor]:
    """The teacher-forced L2I image-token cross-entropy at the `select`ed `labels`, and its logits `[B * N, V]`
    (which the teacher-forced loop's image is drawn from)."""
    hidden = mixed_forward(model, batch["l2i_input_ids"], batch["l2i_image_mask"], batch["l2i_attention_mask"])
    logits = image_logits(model, hidden[select]).float()  # [B * N, V]
    targets = labels[select]
    accuracy = (logits.detach().argmax(-1) == targets).float().mean().item() if len(targets) else 0.0
    return TargetLoss(F.cross_entropy(logits, targets), len(targets), accuracy), logits


def _loop_image_embeddings(
    model: torch.nn.Module,
    reader: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    loop_image: str,
    logits: torch.Tensor | None,
    tau: float,
    straight_through: bool,
    special_ids: tuple[int, int, int] | None,
    guidance_scale: float,
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The soft image tokens the `reader` sees in the loop, embedded: from the teacher-forced L2I `logits`, or from
    the policy `model`'s own self-forced or autoregressive image (see [`djo_losses`])."""
    if loop_image == "teacher_forced":
        _, embeds = soft_image_tokens(reader, logits, tau, straight_through, generator)
        return embeds
    if loop_image == "self_forced":
        codes = sample_images(model, batch, special_ids, guidance_scale, temperature, generator)
        logits = self_forced_logits(model, batch, codes)
        y = gumbel_at(logits, codes.reshape(-1), tau, straight_through, generator)
    else:
        y, _ = autoregressive_loop(model, batch, special_ids[2], tau, generator=generator)
        y = y.reshape(-1, y.shape[-1])
    return soft_code_embeddings(reader, y)


def djo_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    tau: float,
    straight_through: bool = True,
    loop_weight: float = 1.0,
    *,
    loop_image: str = "teacher_forced",
    grounder: torch.nn.Module | None = None,
    l2i_weight: float = 1.0,
    i2l_weight: float = 0.0,
    special_ids: tuple[int, int, int] | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> DJOLosses:
    """The DJO losses of a batch from `LoopLossCollator`.

    Args:
        batch (`dict[str, torch.Tensor]`): the `l2i_*` and `i2l_*` tensors of `LoopLossCollator`.
        tau (`float`): the Gumbel-Softmax temperature.
        straight_through (`bool`, *optional*, defaults to `True`): see `soft_image_tokens`.
        loop_weight (`float`, *optional*, defaults to `1.0`): `lambda`.
        loop_image (`str`, *optional*, defaults to `"teacher_forced"`): where the loop's image comes from
            (`echogen_rl.trainer.djo_loop`): `teacher_forced`, `self_forced` or `autoregressive`.
        grounder (`torch.nn.Module`, *optional*): the model that reads the loop's image (a frozen copy, so that
            only the generator can lower `L_loop`); the policy `model` when unset.
        l2i_weight (`float`, *optional*, defaults to `1.0`): weight of `L_L2I` (0: the loop alone; then no
            teacher-forced pass is made except as the teacher-forced loop's image).
        i2l_weight (`float`, *optional*, defaults to `0.0`): weight of the grounding loss on the *real* image
            (the I2L rows as the collator built them), which trains the policy's grounder on real images.
        special_ids (`tuple[int, int, int]`, *optional*): BOS, `<begin_of_image>` and pad ids; needed by the
            self-forced and autoregressive images.
        guidance_scale, temperature (`float`): how the self-forced image is sampled.
        generator (`torch.Generator`, *optional*): the sampling and Gumbel noise.

    Returns:
        `DJOLosses`: `J` and its parts: the L2I image-token cross-entropy, the I2L answer cross-entropy on the
        loop's image tokens, and (with `i2l_weight`) on the real image.
    """
    labels = batch["l2i_image_labels"]
    select = labels != IGNORE_INDEX
    _check_loop_inputs(batch, select, loop_image, special_ids)
    l2i = logits = None
    if l2i_weight > 0 or loop_image == "teacher_forced":
        l2i, logits = _l2i_loss(model, batch, labels, select)

    reader = model if grounder is None else grounder
    embeds = _loop_image_embeddings(
        model,
        reader,
        batch,
        loop_image,
        logits,
        tau,
        straight_through,
        special_ids,
        guidance_scale,
        temperature,
        generator,
    )
    hidden = mixed_forward(
        reader, batch["i2l_input_ids"], batch["i2l_image_mask"], batch["i2l_attention_mask"], image_embeds=embeds
    )
    loop = masked_cross_entropy(reader, hidden, batch["i2l_text_labels"], "text")
    if l2i is None:
        l2i = _no_loss(loop.loss)
    total = l2i_weight * l2i.loss + loop_weight * loop.loss
    i2l = None
    if i2l_weight > 0:
        hidden = mixed_forward(model, batch["i2l_input_ids"], batch["i2l_image_mask"], batch["i2l_attention_mask"])
        i2l = masked_cross_entropy(model, hidden, batch["i2l_text_labels"], "text")
        total = total + i2l_weight * i2l.loss
    return DJOLosses(total, l2i, loop, i2l)


class DJOTrainer(LayoutSFTTrainer):
    """Trainer for Stage 2, DJO.

    The changes w.r.t. [`~trl.SFTTrainer`] are the data collator ([`LoopLossCollator`]: dataset preparation is
    skipped, rows are built from `caption` / `layout` / `image_codes`) and two hooks: `compute_loss` (the DJO
    objective, see [`djo_losses`], with `tau` and `lambda` scheduled by the optimizer step) and `log` (adds the
    `tau` and `lambda` of the latest step). Everything else (optimizer, PEFT, accelerate, checkpointing) is
    inherited. Arguments: see [`LayoutSFTTrainer`] (`model` is usually a PMTP checkpoint, `args` a [`DJOConfig`]).
    """

    _tag_names = ["trl", "sft", "echogen-rl", "djo"]

    def __init__(self, model, args: DJOConfig, train_dataset, eval_dataset=None, processing_class=None, **kwargs):
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, **kwargs)
        self._last_schedule: dict[str, float] = {}
        if self.loop_reader is not None:
            self.loop_reader.to(self.accelerator.device)

    def prepare_stage(self, model, args: DJOConfig, prompts, train_dataset, processing_class) -> LoopLossCollator:
        absent = self.absent_phrases(args, train_dataset)
        kinds = None
        if args.kind_negative_prob or args.color_negative_prob:
            kinds = KindNegatives(args.kind_negative_prob, redraw=False, colors=args.color_negative_prob)
        janus = unwrap_janus(model)
        self.special_ids = (prompts.bos_id, prompts.boi_id, prompts.pad_id)
        self.loop_guidance_scale = resolve_guidance_scale(
            janus, args.loop_guidance_scale, "DJOConfig.loop_guidance_scale"
        )
        if args.loop_image == "autoregressive":
            check_autoregressive_memory(janus, args)
        # A frozen copy of the starting model reads the loop: L_loop then reaches only the generator.
        self.loop_reader = None
        if args.loop_grounder == "frozen":
            if args.loop_grounder_path:
                from echogen_rl.models.loading import load_janus

                reader, reader_tokenizer = load_janus(args.loop_grounder_path)
                if reader_tokenizer.get_vocab() != processing_class.get_vocab():
                    raise ValueError(
                        f"DJOConfig.loop_grounder_path: {args.loop_grounder_path} has another tokenizer than the model"
                    )
            else:
                reader = copy.deepcopy(janus)
            self.loop_reader = reader.eval().requires_grad_(False)
        return LoopLossCollator(prompts, args.max_length, absent, kinds, args.shuffle_grounding_queries)

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
        args = self.args
        # Autocast around the whole loss, not only the model's forward: the self-forced sample and a frozen loop
        # grounder run the language model outside the wrapped forward. Noise comes from the global RNG, which a
        # checkpoint saves, so that a resumed run draws the same samples.
        with self.accelerator.autocast():
            out = djo_losses(
                model,
                inputs,
                schedule["tau"],
                args.straight_through,
                schedule["loop_weight"],
                loop_image=args.loop_image,
                grounder=self.loop_reader,
                l2i_weight=args.l2i_loss_weight,
                i2l_weight=args.i2l_loss_weight,
                special_ids=self.special_ids,
                guidance_scale=self.loop_guidance_scale,
                temperature=args.loop_temperature,
            )
        self.log_losses(mode, {"l2i": out.l2i, "loop": out.loop, "i2l": out.i2l})
        metrics = self._metrics[mode]
        # Under FSDP2 the extra backward would run the sharding's gradient hooks (and the parameters it asks about
        # are shards the forward never read), so the measure is left out there.
        if mode == "train" and self.state.global_step % max(args.logging_steps, 1) == 0 and not self.is_fsdp_enabled:
            # How hard each loss pulls the generator: the gradient norm on `generation_head` (an extra partial
            # backward, on logging steps only).
            head = [p for p in unwrap_janus(model).model.generation_head.parameters() if p.requires_grad]
            for task, part, weight in (
                ("loop", out.loop, schedule["loop_weight"]),
                ("l2i", out.l2i, args.l2i_loss_weight),
            ):
                if head and part.count and weight > 0 and part.loss.requires_grad:
                    grads = torch.autograd.grad(weight * part.loss, head, retain_graph=True, allow_unused=True)
                    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 0.0)
                    metrics[f"grad_norm_{task}/generation_head"].append(float(norm))
        if mode == "train":
            self._last_schedule = schedule
        return (out.loss, out) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # tau and lambda change every step: log the values the latest step used, not a mean over the window.
        if "loss" in logs:
            logs.update(self._last_schedule)
        super().log(logs, start_time)
