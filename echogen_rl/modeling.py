"""The mixed text / VQ-token forward of `JanusForConditionalGeneration`, without forking it."""

from __future__ import annotations

import torch
from transformers import JanusForConditionalGeneration


def unwrap_janus(model: torch.nn.Module) -> JanusForConditionalGeneration:
    """The `JanusForConditionalGeneration` inside PEFT, accelerate/DDP or torch.compile wrappers."""
    seen = model
    for _ in range(8):
        if isinstance(seen, JanusForConditionalGeneration):
            return seen
        for attr in ("module", "_orig_mod", "base_model", "model"):
            inner = getattr(seen, attr, None)
            if isinstance(inner, torch.nn.Module):
                seen = inner
                break
        else:
            break
    raise TypeError(f"expected a JanusForConditionalGeneration (possibly wrapped), got {type(model).__name__}")
