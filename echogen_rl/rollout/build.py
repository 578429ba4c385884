"""One way to build a rollout engine by name, for the trainer and for scripts: `build_engine("torch" | "vllm", ...)`."""

from __future__ import annotations

import os

import torch

from echogen_rl.rollout.base import RolloutEngine
from echogen_rl.rollout.torch_engine import TorchRolloutEngine

ROLLOUT_ENGINES = ("torch", "vllm")


def build_engine(
    name: str,
    model: torch.nn.Module,
    num_image_tokens: int,
    special_ids: tuple[int, int, int],
    compile: bool = False,
    process_index: int = 0,
    local_process_index: int = 0,
    num_processes: int = 1,
    **vllm_options,
) -> RolloutEngine:
    """The rollout engine `name` on `model` (the unwrapped policy).

    Args:
        name (`str`): `"torch"` (the engine runs the training model itself) or `"vllm"` (a colocated vLLM engine
            whose weights are synced from `model`).
        special_ids (`tuple[int, int, int]`): the BOS, begin-of-image and pad token ids.
        compile (`bool`, *optional*): the torch engine's `torch.compile`.
        process_index, local_process_index, num_processes (`int`, *optional*): where this process sits in the
            launcher's process group; with several processes each builds its own vLLM engine over that group (as TRL's
            colocate mode), which vLLM reads from `RANK`, `LOCAL_RANK` and `WORLD_SIZE`.
        vllm_options: the keyword arguments of [`VLLMRolloutEngine`] (`cfg`, `dtype`, `max_num_seqs`, ...).
    """
    if name == "torch":
        if vllm_options:
            raise ValueError(f"build_engine('torch'): options {sorted(vllm_options)} are the vLLM engine's")
        return TorchRolloutEngine(model, num_image_tokens, *special_ids, compile=compile)
    if name == "vllm":
        from echogen_rl.rollout.vllm_engine import VLLMRolloutEngine

        distributed = num_processes > 1
        if distributed:
            from trl.trainer.utils import ensure_master_addr_port

            os.environ["RANK"] = str(process_index)
            os.environ["LOCAL_RANK"] = str(local_process_index)
            os.environ["WORLD_SIZE"] = str(num_processes)
            ensure_master_addr_port()
        return VLLMRolloutEngine(model, num_image_tokens, *special_ids, distributed=distributed, **vllm_options)
    raise ValueError(f"rollout engine must be one of {ROLLOUT_ENGINES}, got {name!r}")
