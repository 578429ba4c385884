"""Configuration of Stage 2, DJO (dual-task joint optimization)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from echogen_rl.trainer.callbacks import SampleLoggingArguments

TAU_SCHEDULES = ("exponential", "constant")
LOOP_IMAGES = ("teacher_forced", "self_forced", "autoregressive")  # see echogen_rl.trainer.djo_loop
LOOP_GROUNDERS = ("policy", "frozen")


@dataclass
class DJOConfig(SFTConfig, SampleLoggingArguments):
    r"""
    Configuration for [`DJOTrainer`]. Only the new fields are listed; everything else is [`~trl.SFTConfig`].

    The loss is `J = L_L2I + lambda * L_loop`: the L2I image-token cross-entropy, plus the I2L layout-answer
    cross-entropy read from the Gumbel-Softmax image tokens of the L2I logits (the loop). `max_length` caps each
    of the two sequences of a sample; a longer one is an error naming the sample, never truncated. TRL's `packing`
    and `padding_free` are not used: the collator builds its own rows.

    Sample logging (`log_images_steps`, `log_images_count`): see [`~echogen_rl.trainer.callbacks.SampleLoggingArguments`].

    Parameters:
        loop_weight (`float`, *optional*, defaults to `1.0`):
            Weight `lambda` of the loop loss `L_loop`.
        loop_weight_warmup_steps (`int`, *optional*, defaults to `0`):
            Steps over which `lambda` rises linearly from 0 to `loop_weight`; `0` uses `loop_weight` from the start.
        gumbel_tau_start (`float`, *optional*, defaults to `1.0`):
            Gumbel-Softmax temperature at step 0.
        gumbel_tau_end (`float`, *optional*, defaults to `0.3`):
            Gumbel-Softmax temperature after `tau_anneal_steps` (exponential schedule only).
        tau_schedule (`str`, *optional*, defaults to `"exponential"`):
            `"exponential"`: `tau = tau_start * (tau_end / tau_start) ** min(step / tau_anneal_steps, 1)`;
            `"constant"`: `tau = tau_start` throughout.
        tau_anneal_steps (`int` or `None`, *optional*, defaults to `None`):
            Steps over which `tau` anneals; `None` is the run's total number of optimizer steps.
        straight_through (`bool`, *optional*, defaults to `True`):
            Feed hard one-hot image tokens forward and pass the soft (Gumbel-Softmax) gradients back; `False`
            feeds the soft mixtures themselves.
        absent_phrase_prob (`float`, *optional*, defaults to `0.0`):
            Share of I2L queries that also ask for a phrase the image does not hold (from the training layouts'
            phrases), answered "not present" (`<box>[]</box>`): the grounder learns to refuse what is not there.
        kind_negative_prob (`float`, *optional*, defaults to `0.0`):
            Shapes world: share of the loop's queries asking for one entity's color with another kind, answered
            "not present" (see [`~echogen_rl.data.kind_negatives.KindNegatives`]).
        color_negative_prob (`float`, *optional*, defaults to `0.0`):
            Shapes world: share of the other loop queries asking for one entity's kind in a color the layout does not
            name, answered "not present".
        shuffle_grounding_queries (`bool`, *optional*, defaults to `False`):
            Ask each loop query's phrases in an order fixed by the example's content, not the layout's (see
            [`~echogen_rl.data.collators.shuffled_query`]).
        loop_image (`str`, *optional*, defaults to `"self_forced"`):
            Where the loop's image comes from (see [`~echogen_rl.trainer.djo_loop`]): `"self_forced"` (the model's own
            free-running sample, then one pass over it with straight-through Gumbel samples fixed to its codes),
            `"autoregressive"` (a differentiable rollout; small images only) or `"teacher_forced"` (the logits
            over the true codes: the grounder sees the real image with a few changed cells; a comparison mode).
        loop_grounder (`str`, *optional*, defaults to `"policy"`):
            Who reads the loop's image: `"policy"` (the model being trained) or `"frozen"` (a frozen copy of the
            starting model, or of `loop_grounder_path`, so that only the generator can lower `L_loop`).
        loop_grounder_path (`str` or `None`, *optional*, defaults to `None`):
            With `loop_grounder: frozen`, the checkpoint whose grounder reads the loop (e.g. a better-trained
            one); `None` copies the starting model.
        l2i_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight of `L_L2I`; `0` trains by the loop alone.
        i2l_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the grounding loss on the real image, which keeps the policy's grounder trained on real
            images (DJO otherwise trains it only through the loop).
        loop_guidance_scale (`float` or `None`, *optional*, defaults to `None`):
            CFG scale of the self-forced sample; `None` is the checkpoint's recorded sampling.
        loop_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of the self-forced image (0: greedy).
        loop_memory_limit_gib (`float` or `None`, *optional*, defaults to `None`):
            The autoregressive loop refuses to start when its activations' estimate exceeds this; `None` is the
            device's memory (the host's on a CPU).
    """

    loop_weight: float = field(default=1.0, metadata={"help": "Weight lambda of the loop loss L_loop."})
    loop_weight_warmup_steps: int = field(
        default=0, metadata={"help": "Steps of linear warm-up of lambda from 0; 0: no warm-up."}
    )
    gumbel_tau_start: float = field(default=1.0, metadata={"help": "Gumbel-Softmax temperature at step 0."})
    gumbel_tau_end: float = field(default=0.3, metadata={"help": "Gumbel-Softmax temperature once annealed."})
    tau_schedule: str = field(
        default="exponential",
        metadata={"help": "Temperature schedule: exponential or constant.", "choices": list(TAU_SCHEDULES)},
    )
    tau_anneal_steps: int | None = field(
        default=None, metadata={"help": "Steps over which tau anneals; None: the run's total steps."}
    )
    straight_through: bool = field(
        default=True, metadata={"help": "Hard one-hot tokens forward, soft gradients back (straight-through)."}
    )

    absent_phrase_prob: float = field(
        default=0.0, metadata={"help": "Share of I2L queries that also ask for an absent phrase ('not present')."}
    )

    kind_negative_prob: float = field(
        default=0.0, metadata={"help": "Shapes world: share of loop queries asking one entity as another kind."}
    )
    color_negative_prob: float = field(
        default=0.0,
        metadata={"help": "Shapes world: share of the other loop queries asking one entity in another color."},
    )
    shuffle_grounding_queries: bool = field(
        default=False,
        metadata={
            "help": "Ask each grounding query's phrases in a shuffled order (fixed per example), not the "
            "layout's: the grounder must match phrases by their words, not by reading order."
        },
    )
    loop_image: str = field(
        default="self_forced",
        metadata={
            "help": "The loop's image: self_forced, autoregressive or teacher_forced.",
            "choices": list(LOOP_IMAGES),
        },
    )
    loop_grounder: str = field(
        default="policy",
        metadata={"help": "Who reads the loop's image: policy or frozen.", "choices": list(LOOP_GROUNDERS)},
    )
    loop_grounder_path: str | None = field(
        default=None, metadata={"help": "With loop_grounder frozen: the checkpoint that reads the loop."}
    )
    l2i_loss_weight: float = field(default=1.0, metadata={"help": "Weight of L_L2I; 0 trains by the loop alone."})
    i2l_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the grounding loss on real images."})
    loop_guidance_scale: float | None = field(
        default=None, metadata={"help": "CFG scale of the self-forced sample; None: the checkpoint's recorded one."}
    )
    loop_temperature: float = field(default=1.0, metadata={"help": "Temperature of the self-forced sample."})
    loop_memory_limit_gib: float | None = field(
        default=None, metadata={"help": "Refuse an autoregressive loop estimated above this; None: device memory."}
    )

    def __post_init__(self):
        # The heads run after `model.forward` returns (only where a label is): DDP's search for unused parameters
        # would call them unused, then fail when their gradients arrive. The trainer freezes what gets no gradient.
        if self.ddp_find_unused_parameters is None:
            self.ddp_find_unused_parameters = False
        # The collator builds token rows from caption / layout / image_codes; TRL must not tokenize or drop them.
        self.dataset_kwargs = {**(self.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.remove_unused_columns = False
        # Evaluation reports the losses; there are no whole-sequence logits to return.
        self.prediction_loss_only = True
        super().__post_init__()
        self.check_sample_logging()
        for name in ("absent_phrase_prob", "kind_negative_prob", "color_negative_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"DJOConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.packing or self.padding_free:
            raise ValueError(
                "DJOConfig: `packing` and `padding_free` are TRL's text packing, which DJO's collator does not use. "
                "Leave them False."
            )
        for name in ("loop_weight", "l2i_loss_weight", "i2l_loss_weight", "loop_temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"DJOConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.loop_image not in LOOP_IMAGES:
            raise ValueError(f"DJOConfig.loop_image must be one of {LOOP_IMAGES}, got {self.loop_image!r}")
        if self.loop_grounder not in LOOP_GROUNDERS:
            raise ValueError(f"DJOConfig.loop_grounder must be one of {LOOP_GROUNDERS}, got {self.loop_grounder!r}")
        if self.loop_grounder_path and self.loop_grounder != "frozen":
            raise ValueError("DJOConfig.loop_grounder_path is read only with loop_grounder='frozen'")
        if self.loop_image == "autoregressive" and not self.straight_through:
            raise ValueError(
                "DJOConfig: loop_image='autoregressive' feeds hard samples forward; keep straight_through"
            )
        if self.loop_weight == 0 and self.l2i_loss_weight == 0 and self.i2l_loss_weight == 0:
            raise ValueError("DJOConfig: every loss weight is 0; nothing would train")
        _check_int("loop_weight_warmup_steps", self.loop_weight_warmup_steps, 0)
        for name in ("gumbel_tau_start", "gumbel_tau_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DJOConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.tau_schedule not in TAU_SCHEDULES:
            raise ValueError(f"DJOConfig.tau_schedule must be one of {TAU_SCHEDULES}, got {self.tau_schedule!r}")
        if self.tau_anneal_steps is not None:
            _check_int("tau_anneal_steps", self.tau_anneal_steps, 1)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DJOConfig.{name} must be an int >= {minimum}, got {value!r}")
