"""Sharded training: which module calls FSDP2 and ZeRO-3 gather, and the check that stops a run sharding in a way
this package does not support."""

from __future__ import annotations

import os
import warnings

from accelerate.utils import DistributedType


def check_sharding(trainer) -> None:
    """Stops a trainer under FSDP with a message that says what to use instead, and warns when an accelerate config
    asked for FSDP or DeepSpeed but the processes run plain data parallelism (accelerate does so on CPUs).

    The embeddings run before `model.forward` and the two heads after it (only at the positions with a target, so
    that no [B, T, vocabulary] logits are built). FSDP gathers a module's weights around its `forward` and keeps
    them sharded elsewhere, so those calls would read shards (under FSDP2: "mixed torch.Tensor and DTensor").
    """
    name = type(trainer).__name__
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            f"{name} does not support FSDP: the embeddings and heads run outside the model's forward, where FSDP "
            "leaves their weights sharded. Use recipes/accelerate_configs/ddp.yaml, or zero2.yaml / zero3.yaml to "
            "shard with DeepSpeed."
        )
    asked = [kind for kind in ("DEEPSPEED", "FSDP") if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true"]
    accelerator = getattr(trainer, "accelerator", None)
    if asked and accelerator is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        warnings.warn(
            f"{name}: the accelerate config asks for {asked[0]}, but on CPU processes accelerate runs plain data "
            "parallelism (every process holds the whole model and optimizer state).",
            stacklevel=2,
        )
