"""Loading a Janus checkpoint, its tokenizer and a LoRA config from TRL's `ModelConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, JanusForConditionalGeneration
from trl import ModelConfig, get_peft_config

from .prompts import add_layout_tokens
from .tiny import ensure_tiny_checkpoint

# LoRA on the language model and the image head: the SigLIP understanding path is unused by training, and its
# projections share names (q_proj, v_proj, ...) with the Llama's.
DEFAULT_LORA_TARGETS = r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|generation_head\.(proj_out|vision_head))"


def require_checkpoint(path: str, how_to_make: str) -> None:
    """Fails early, saying how to make it, when a recipe's starting checkpoint is a missing local path."""
    if "/" in path and not Path(path).exists() and (path.startswith((".", "/")) or path.startswith("outputs")):
        raise FileNotFoundError(f"no checkpoint at {path}; make it first with:\n    {how_to_make}")


def load_janus(
    model_name_or_path: str,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    build_tiny_if_missing: bool = False,
):
    """Loads a `JanusForConditionalGeneration` and its tokenizer, adding the layout tags when missing.

    Args:
        model_name_or_path (`str`): a local checkpoint or a hub id (e.g. `deepseek-community/Janus-Pro-1B`).
        dtype (`str` or `torch.dtype`, *optional*): e.g. `"bfloat16"`; `None` or `"auto"` keeps the checkpoint's.
        attn_implementation (`str`, *optional*): `"sdpa"` (default in transformers), `"eager"`, ...
        build_tiny_if_missing (`bool`, *optional*, defaults to `False`): if `model_name_or_path` is a local
            path with no checkpoint, build the offline tiny checkpoint there first.

    Returns:
        `tuple[JanusForConditionalGeneration, PreTrainedTokenizerBase]`
    """
    path = Path(model_name_or_path)
    if build_tiny_if_missing and not (path / "config.json").exists():
        print(f"no checkpoint at {path}: building the offline tiny Janus checkpoint there")
        ensure_tiny_checkpoint(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = JanusForConditionalGeneration.from_pretrained(model_name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_layout_tokens(tokenizer, model)
    return model, tokenizer


def lora_config_from(model_args):
    """TRL's `get_peft_config`, with LoRA on the language model's projections unless targets are given."""
    config = get_peft_config(model_args)
    if config is not None and not model_args.lora_target_modules:
        config.target_modules = DEFAULT_LORA_TARGETS
    return config


@dataclass
class JanusModelConfig(ModelConfig):
    r"""
    TRL's [`~trl.ModelConfig`] plus one field. LoRA targets default to the language model's projections.

    Parameters:
        build_tiny_if_missing (`bool`, *optional*, defaults to `False`):
            If `model_name_or_path` is a local path without a checkpoint, build the offline tiny Janus
            checkpoint there (the offline default of the shapes recipes).
    """

    build_tiny_if_missing: bool = field(
        default=False,
        metadata={"help": "Build the offline tiny Janus checkpoint at model_name_or_path if none is there."},
    )
