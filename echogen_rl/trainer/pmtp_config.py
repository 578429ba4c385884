"""Configuration of Stage 1, PMTP (parallel multi-task pre-training)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from echogen_rl.trainer.callbacks import SampleLoggingArguments


@dataclass
class PMTPConfig(SFTConfig, SampleLoggingArguments):
    r"""
    Configuration for [`PMTPTrainer`]. Only the new fields are listed; everything else is [`~trl.SFTConfig`].

    The loss is `image_loss_weight * CE(L2I image tokens) + text_loss_weight * CE(I2L layout answer)`, each
    averaged over its own targets. `max_length` is the number of tokens per packed row. TRL's own `packing`
    and `padding_free` are not used: PMTP's collator packs whole samples itself (see `pack_segments`).

    Sample logging (`log_images_steps`, `log_images_count`): see [`~echogen_rl.trainer.callbacks.SampleLoggingArguments`].

    Parameters:
        image_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight `w_img` of the L2I image-token cross-entropy.
        text_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight `w_text` of the I2L layout-answer cross-entropy.
        pack_segments (`bool`, *optional*, defaults to `True`):
            Pack several samples per row up to `max_length`; `False` gives every task segment a row of its own.
        uncond_prob (`float`, *optional*, defaults to `0.1`):
            Chance that an L2I prompt is blanked to the unconditional row, which trains the branch that
            classifier-free guidance subtracts. Without it, sampling with CFG degrades images.
        segment_attention (`bool`, *optional*, defaults to `True`):
            Attend within each packed segment by gathering it (varlen attention, any attention backend);
            `False` uses a dense block-diagonal 4D mask over each row, whose cost grows with the row squared.
        absent_phrase_prob (`float`, *optional*, defaults to `0.0`):
            Share of I2L queries that also ask for a phrase the image does not hold (from the training layouts'
            phrases), answered "not present" (`<box>[]</box>`): the grounder learns to refuse what is not there.
        kind_negative_prob (`float`, *optional*, defaults to `0.0`):
            Shapes world: share of I2L examples made a negative of one entity's kind, answered "not present": its
            cells redrawn as another kind (a filled box, say) with its phrase asked as before, or another kind of its
            color asked (see [`~echogen_rl.data.kind_negatives.KindNegatives`]). The grounder learns to read shape, so that
            a cycle reward stops paying a painted box as much as a drawing.
        color_negative_prob (`float`, *optional*, defaults to `0.0`):
            Shapes world: share of the other I2L examples made a negative of one entity's color, answered "not
            present": its cells recolored to a color the layout does not name with its phrase asked as before, or its
            kind asked in such a color. The grounder learns to read color, so that a cycle reward stops paying a
            shape drawn in the wrong color.
        shuffle_grounding_queries (`bool`, *optional*, defaults to `False`):
            Ask each I2L query's phrases in an order fixed by the example's content, not the layout's (see
            [`~echogen_rl.data.collators.shuffled_query`]). Asked in reading order, a grounder can answer the i-th
            phrase with the i-th shape without reading its words, and a cycle reward read by it pays any color.
    """

    image_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the L2I image-token loss."})
    text_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the I2L layout-answer loss."})
    pack_segments: bool = field(
        default=True, metadata={"help": "Pack several samples per row up to `max_length` (padding-free)."}
    )

    uncond_prob: float = field(
        default=0.1, metadata={"help": "Chance of blanking an L2I prompt to CFG's unconditional row."}
    )
    segment_attention: bool = field(
        default=True,
        metadata={"help": "Per-segment (varlen) attention; False uses a dense block-diagonal 4D mask per row."},
    )

    absent_phrase_prob: float = field(
        default=0.0, metadata={"help": "Share of I2L queries that also ask for an absent phrase ('not present')."}
    )

    kind_negative_prob: float = field(
        default=0.0,
        metadata={"help": "Shapes world: share of I2L examples whose one entity is redrawn or asked as another kind."},
    )
    color_negative_prob: float = field(
        default=0.0,
        metadata={
            "help": "Shapes world: share of the other I2L examples whose one entity is recolored or asked in "
            "another color."
        },
    )
    shuffle_grounding_queries: bool = field(
        default=False,
        metadata={
            "help": "Ask each grounding query's phrases in a shuffled order (fixed per example), not the "
            "layout's: the grounder must match phrases by their words, not by reading order."
        },
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
                raise ValueError(f"PMTPConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.packing or self.padding_free:
            raise ValueError(
                "PMTPConfig: `packing` and `padding_free` are TRL's text packing; PMTP packs samples itself. "
                "Leave them False and use `pack_segments` / `max_length`."
            )
        for name in ("image_loss_weight", "text_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"PMTPConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.uncond_prob < 1:
            raise ValueError(f"PMTPConfig.uncond_prob must be in [0, 1), got {self.uncond_prob}")
        if self.image_loss_weight == 0 and self.text_loss_weight == 0:
            raise ValueError("PMTPConfig: image_loss_weight and text_loss_weight are both 0; nothing would train")
