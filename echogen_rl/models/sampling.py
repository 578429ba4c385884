"""How a checkpoint is meant to be sampled, recorded in its generation config and read back by every command.

Classifier-free guidance mixes a conditional and an unconditional prediction, `u + s * (c - u)`; it only helps a
model that learned the unconditional branch (PMTP with `uncond_prob > 0`, or Janus-Pro's own pretraining). A model
that never saw an unconditional row returns noise there, and a scale above 1 floods its images with it. So each
checkpoint says in `generation_config.json`:

- `sampling_guidance_scale`: the scale `generate`, `eval`, the demo and CycleRL's rollouts use when none is given
  (a checkpoint without it, Janus-Pro as published, is sampled at its `guidance_scale`). transformers' own
  `guidance_scale` is left as it is: Janus's `generate(generation_mode="image")` always runs both branches and
  needs a scale above 1;
- `unconditional_branch`: whether the model was trained with unconditional rows. A checkpoint without the key
  (Janus-Pro as published) is taken to have one.
- `temperature`: the sampling temperature `generate` uses when none is given.
"""

from __future__ import annotations

import warnings

import torch

JANUS_GUIDANCE_SCALE = 5.0  # Janus-Pro's published default


def _generation_config(model: torch.nn.Module):
    from echogen_rl.models.modeling import unwrap_janus

    return unwrap_janus(model).generation_config


def has_unconditional_branch(model: torch.nn.Module) -> bool:
    """Whether the model's generation config says it was trained with unconditional rows (`True` when unsaid)."""
    return bool(getattr(_generation_config(model), "unconditional_branch", True))


def record_sampling(model: torch.nn.Module, unconditional_branch: bool) -> None:
    """Writes into the model's generation config how it should be sampled, saved with the model from then on.

    Without an unconditional branch the recorded guidance scale is 1 (no CFG); a model that gains one gets
    Janus-Pro's scale if it had none above 1.
    """
    config = _generation_config(model)
    config.unconditional_branch = unconditional_branch
    if not unconditional_branch:
        config.sampling_guidance_scale = 1.0
    elif _recorded_scale(config) <= 1.0:
        config.sampling_guidance_scale = JANUS_GUIDANCE_SCALE


def resolve_guidance_scale(model: torch.nn.Module, guidance_scale: float | None, where: str) -> float:
    """`guidance_scale`, or the model's recorded one when `None`; warns when CFG > 1 meets a model with no
    unconditional branch.

    Args:
        model (`torch.nn.Module`): the Janus model (possibly wrapped).
        guidance_scale (`float`, *optional*): an explicit scale; it wins over the recorded one.
        where (`str`): who asks (a command or config field), named in the warning.
    """
    if guidance_scale is None:
        guidance_scale = _recorded_scale(_generation_config(model))
    if guidance_scale < 0:
        raise ValueError(f"{where}: guidance scale must be >= 0, got {guidance_scale}")
    if guidance_scale > 1 and not has_unconditional_branch(model):
        warnings.warn(
            f"{where}: guidance scale {guidance_scale:g} on a model trained without unconditional rows "
            "(generation_config.unconditional_branch is false): its unconditional prediction is untrained and CFG "
            "will flood the images. Use 1, or train PMTP with uncond_prob > 0.",
            UserWarning,
            stacklevel=2,
        )
    return guidance_scale


def _recorded_scale(config) -> float:
    for key in ("sampling_guidance_scale", "guidance_scale"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    return JANUS_GUIDANCE_SCALE


def resolve_temperature(model: torch.nn.Module, temperature: float | None) -> float:
    """`temperature`, or the model's recorded one (1 when unrecorded) when `None`."""
    if temperature is None:
        recorded = getattr(_generation_config(model), "temperature", None)
        temperature = 1.0 if recorded is None else float(recorded)
    return temperature
