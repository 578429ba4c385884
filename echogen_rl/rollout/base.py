"""The rollout engine interface: prompts in, image codes and their log-probs out.

The trainer only calls `generate`, so a plain torch engine and a vLLM engine are interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class RolloutOutput:
    """Image-token rollouts.

    Attributes:
        codes (`torch.LongTensor` of shape `[B, N]`): the sampled image codes.
        logprobs (`torch.Tensor` of shape `[B, N]`): log-probability of each code under the distribution it
            was drawn from (guided by CFG, after temperature and top-k).
    """

    codes: torch.LongTensor
    logprobs: torch.Tensor


class RolloutEngine(ABC):
    """Generates image codes for L2I prompts with classifier-free guidance."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: torch.LongTensor,
        prompt_mask: torch.Tensor,
        guidance_scale: float = 5.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> RolloutOutput:
        """Samples one image per prompt row.

        Args:
            prompt_ids (`torch.LongTensor` of shape `[B, T]`): left-padded L2I prompts ending in `<begin_of_image>`.
            prompt_mask (`torch.Tensor` of shape `[B, T]`): 1 on prompt tokens, 0 on padding.
            guidance_scale (`float`, *optional*, defaults to `5.0`): CFG scale `s` in `u + s * (c - u)`;
                `1.0` samples the conditional distribution alone.
            temperature (`float`, *optional*, defaults to `1.0`): `0` decodes greedily.
            top_k (`int`, *optional*): keep the k most likely codes.
            generator (`torch.Generator`, *optional*): seeds the sampling.
        """

    def sync_weights(self, model: torch.nn.Module, step: int | None = None) -> bool:
        """Makes the engine generate with the current weights of `model`; returns whether weights were copied.

        `step` is the trainer's optimizer step: an engine holding a copy may skip the copy when it already holds that
        step's weights. An engine that generates with the module itself (the torch engine) copies nothing.
        """
        return False
