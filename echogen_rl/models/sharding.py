"""Sharded training: the FSDP2 units of a Janus model ([`shard_janus`]), and the check that stops a trainer sharding
in a way this package does not support."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from accelerate.utils import DistributedType

from echogen_rl.models.modeling import soft_code_inputs, unwrap_janus


def prepare_sharding(trainer) -> None:
    """Shards a trainer's model with [`shard_janus`] under accelerate's FSDP2 (before accelerate prepares it, which
    then leaves an FSDP2 model as it is); stops it under FSDP1 with a message that says what to use instead, and
    under DeepSpeed when accelerate counts fewer processes than were launched (its DeepSpeed path on CPU processes
    counts one: every process would train on the same batches); warns when an accelerate config asked for FSDP or
    DeepSpeed but the processes run plain data parallelism.

    FSDP1's auto-wrapping would leave the embeddings and heads in units gathered only around the model's `forward`,
    while they also run outside it (the heads at the positions with a target, DJO's soft tokens).
    """
    from torch.distributed.fsdp import FSDPModule

    name = type(trainer).__name__
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = trainer.accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                f"{name} supports FSDP2 only (fsdp_version: 2, as recipes/accelerate_configs/fsdp.yaml sets): "
                "FSDP1's wrapping leaves the embeddings and heads sharded where they run outside the model's forward"
            )
        shard_janus(
            trainer.model,
            mp_policy=getattr(plugin, "mixed_precision_policy", None),
            reshard_after_forward=bool(getattr(plugin, "reshard_after_forward", True)),
        )
        reference = getattr(trainer, "ref_model", None)
        if isinstance(reference, FSDPModule):
            # TRL shards the reference as one unit; its heads run after its call, so it stays gathered from its
            # call to the end of its use (`gathered_root` around each use frees it).
            reference.set_reshard_after_forward(False)
        return
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes != launched:
            raise RuntimeError(
                f"{name}: DeepSpeed runs over the {launched} launched processes, but accelerate counts "
                f"{accelerator.num_processes} (its DeepSpeed path does so on CPU processes), so every process would "
                "train on the same batches. On CPU processes, set `num_processes` and `process_index` of accelerate's "
                "`PartialState` from torch.distributed before building the training arguments."
            )
    asked = [kind for kind in ("DEEPSPEED", "FSDP") if os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() == "true"]
    if asked and accelerator is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        warnings.warn(
            f"{name}: the accelerate config asks for {asked[0]}, but on CPU processes accelerate runs plain data "
            "parallelism (every process holds the whole model and optimizer state).",
            stacklevel=2,
        )


def shard_janus(
    model: torch.nn.Module, mesh=None, mp_policy=None, reshard_after_forward: bool = True
) -> torch.nn.Module:
    """Shards a Janus model (or a PEFT model around one) with FSDP2's `fully_shard`, in place; returns it.

    The units, each gathered around its own calls and freed after (the root's at the end of the backward):
    - each decoder layer, its LoRA weights with it;
    - the generation embeddings, aligner and head: they run outside the model's call too (the head after it
      returns, at the positions with targets; DJO's soft tokens between two calls), where the backward of a later
      call may already have freed the root's weights;
    - the understanding path (`vision_model`, `aligner`) and the VQ model: no training loss calls them, so they stay
      sharded for the whole run;
    - the root: the text embeddings and head (in one unit, as they may be tied) and the final norm, gathered from
      the model's call to the end of its backward. The text head also runs after the call, but only on that call's
      hidden states, whose backward comes first.

    Every weight is read inside a call of its module (`mixed_forward` embeds inside the model's call, DJO's soft
    tokens go through `generation_embeddings`): tested op by op in `tests/test_module_calls.py`.

    Args:
        model (`torch.nn.Module`): a `JanusForConditionalGeneration` or a PEFT model around one; the object the
            trainer calls (the root unit).
        mesh (`DeviceMesh`, *optional*): the data-parallel mesh; by default FSDP2's (all ranks).
        mp_policy (`MixedPrecisionPolicy`, *optional*): e.g. bf16 compute with float32 gradient reduction.
        reshard_after_forward (`bool`, *optional*, defaults to `True`): free each layer's gathered weights after
            its forward (ZeRO-3 like); `False` keeps them to the backward (ZeRO-2 like, more memory, less traffic).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    janus = unwrap_janus(model)
    soft_code_inputs(janus)  # before sharding: FSDP2 derives the module's new class from its class then
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
    }
    inner = janus.model
    for layer in inner.language_model.layers:
        fully_shard(layer, **kwargs)
    for module in (inner.generation_embeddings, inner.generation_aligner, inner.generation_head):
        fully_shard(module, **kwargs)
    for frozen in (inner.vision_model, inner.aligner, inner.vqmodel):
        fully_shard(frozen, **kwargs)
    fully_shard(model, **(kwargs | {"reshard_after_forward": False}))
    # FSDP2 makes the first unit to run a forward its root. A rollout calls the decoder layers directly, so one
    # token goes through the model's own call first; its gathered weights are then freed.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=janus.device), use_cache=False, logits_to_keep=1)
    model.reshard()
    return model


@contextlib.contextmanager
def gathered_root(model: torch.nn.Module):
    """The root unit's weights (text embeddings and head, final norm) gathered while a rollout or the grounder uses
    the model's modules outside its own call (cached decoding calls the language model directly); nothing for a
    model that is not sharded with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def save_sharded_pretrained(model: torch.nn.Module, output_dir: str | os.PathLike) -> None:
    """Saves an FSDP2-sharded model as `save_pretrained` saves an unsharded one: the whole weights of a Janus model,
    or a PEFT model's adapter. A collective: every rank calls it; rank 0 gathers the weights (on the CPU) and
    writes them.

    Args:
        model (`torch.nn.Module`): the model [`shard_janus`] sharded (the root it returned).
        output_dir (`str` or `os.PathLike`): the checkpoint folder, as for `save_pretrained`.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: only rank 0 holds the gathered weights, in host memory, one tensor at a time.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        model.save_pretrained(output_dir, state_dict=state)
    dist.barrier()


def save_fsdp2_model(trainer, output_dir: str | os.PathLike) -> bool:
    """What a trainer's final `save_model` writes under FSDP2: the whole weights (or a PEFT adapter), the tokenizer
    and the training arguments, as an unsharded run writes them, so the next stage or `generate` can load the
    folder. `Trainer.save_model` writes no weights under a sharded state dict (its checkpoints hold the shards, for
    resuming). A collective; returns `False`, having done nothing, when the trainer's model is not FSDP2-sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not (getattr(trainer, "is_fsdp_enabled", False) and isinstance(trainer.model, FSDPModule)):
        return False
    os.makedirs(output_dir, exist_ok=True)
    save_sharded_pretrained(trainer.model, output_dir)
    if trainer.args.should_save:
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
        torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))
    return True
