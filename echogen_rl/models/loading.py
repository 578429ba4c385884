"""Loading a Janus checkpoint, its tokenizer and a LoRA config from TRL's `ModelConfig`."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from peft.utils import get_peft_model_state_dict, load_peft_weights
from safetensors import safe_open
from transformers import AutoTokenizer, JanusForConditionalGeneration
from trl import ModelConfig, get_peft_config

from echogen_rl.models.prompts import add_layout_tokens
from echogen_rl.models.tiny import ensure_tiny_checkpoint

logger = logging.getLogger(__name__)

# LoRA on the language model and the image head: the SigLIP understanding path is unused by training, and its
# projections share names (q_proj, v_proj, ...) with the Llama's.
DEFAULT_LORA_TARGETS = r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|generation_head\.(proj_out|vision_head))"


def producing_config(path: str, configs_dir: str | os.PathLike, stage: str = "*") -> Path | None:
    """The config under `configs_dir/<stage>/` whose `output_dir` is `path`: the run that makes that checkpoint."""
    for config in sorted(Path(configs_dir).glob(f"{stage}/*.yaml")):
        if Path(str((yaml.safe_load(config.read_text()) or {}).get("output_dir", ""))) == Path(path):
            return config
    return None


def require_start_checkpoint(path: str, producer: str | os.PathLike) -> None:
    """Stops a recipe before loading anything when its start checkpoint is the not-yet-made output of a shipped
    config of the stage before (or of the same stage: PMTP's second phase), and names the command that makes it.

    Args:
        path (`str`): the recipe's `model_name_or_path`.
        producer (`str` or `os.PathLike`): the recipe that makes it, e.g. `recipes/pmtp.py`; its configs are
            read from `configs/<stage>/*.yaml` beside it.
    """
    if (Path(path) / "config.json").exists():
        return
    producer = Path(producer)
    config = producing_config(path, producer.parent / "configs", producer.stem)
    if config is not None:
        raise SystemExit(
            f"the start checkpoint {path} does not exist yet. Make it with:\n"
            f"  accelerate launch recipes/{producer.name} --config recipes/configs/{producer.stem}/{config.name}"
        )
    # A path whose folder exists here is meant as a local checkpoint, not a hub id: say so rather than ask the hub.
    if len(Path(path).parts) > 1 and Path(path).parent.is_dir():
        raise SystemExit(
            f"no checkpoint at {path} (no config.json), and no shipped {producer.stem} config writes it. Point "
            f"model_name_or_path at the output_dir of your {producer.stem} run."
        )


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read; the message names the file and what is wrong with it."""


# The files a loader reads from a checkpoint or adapter folder (other JSON, e.g. trainer_state.json, is not read).
_CHECKPOINT_JSON = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "adapter_config.json",
    "model.safetensors.index.json",
)


def check_checkpoint(path: str | os.PathLike) -> None:
    """Reads every file a load of the folder `path` would read, and raises a [`CheckpointError`] naming the first
    one that is unreadable (truncated or not JSON, a safetensors file with a broken header or cut short). A path
    that is not a local folder (a hub id) is left to its loader."""
    folder = Path(path)
    if not folder.is_dir():
        return
    for name in _CHECKPOINT_JSON:
        file = folder / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{file}: not valid JSON, the file is truncated or corrupt ({err})") from None
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError, and OSError on unreadable files
            raise CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt ({err})") from None


@contextmanager
def loading_errors(what: str):
    """Turns what `from_pretrained` raises on a bad checkpoint into one [`CheckpointError`] line that names `what`
    (a missing folder or hub id stays an `OSError` for the caller to name)."""
    try:
        yield
    except (CheckpointError, OSError):
        raise
    except Exception as err:  # transformers, huggingface_hub and tokenizers each raise their own kinds
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{what}: cannot be loaded ({type(err).__name__}: {detail})") from err


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
        # A warning: shown where nothing configured logging (a recipe run on its own, a demo or study worker).
        logger.warning("no checkpoint at %s: building the offline tiny Janus checkpoint there", path)
        ensure_tiny_checkpoint(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    check_checkpoint(path)
    with loading_errors(str(model_name_or_path)):
        model = JanusForConditionalGeneration.from_pretrained(model_name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_layout_tokens(tokenizer, model)
    return model, tokenizer


def attach_adapter(model: torch.nn.Module, adapter: str | os.PathLike) -> PeftModel:
    """`PeftModel.from_pretrained(model, adapter)`, refusing an adapter trained on another base model.

    PEFT raises on a shape mismatch but only warns when adapter weights find no module (e.g. an adapter for a
    deeper model): both are errors here, as either one silently changes what the model computes.

    Args:
        model (`JanusForConditionalGeneration`): the base model.
        adapter (`str` or `os.PathLike`): a PEFT adapter directory.

    Returns:
        `PeftModel`: the base model with the adapter loaded, in inference mode.
    """
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there")
    check_checkpoint(adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError) as err:
        detail = " ".join(str(err).split())  # PyTorch puts each mismatch on a line: one line, cut short
        raise ValueError(f"{adapter} is an adapter for another base model: {detail[:300]}") from err
    saved = set(load_peft_weights(str(adapter), device="cpu"))
    expected = set(get_peft_model_state_dict(peft_model))
    if saved != expected:
        odd = sorted(saved ^ expected)
        raise ValueError(
            f"{adapter} is an adapter for another base model: {len(saved - expected)} of its weights have no module "
            f"in the base and {len(expected - saved)} adapter weights are missing (e.g. {odd[0]})"
        )
    return peft_model


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub id (`owner/model`) rather than a local path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def load_model(
    model_name_or_path: str | os.PathLike, adapter: str | os.PathLike | None = None, device: str | None = None
):
    """A Janus model for inference, in eval mode with a PEFT adapter merged in, and its tokenizer: the one loader of
    `echogen-rl generate`, `ground` and `eval`, the demo and the study.

    Args:
        model_name_or_path (`str` or `os.PathLike`): a Janus checkpoint directory or hub id.
        adapter (`str` or `os.PathLike`, *optional*): a PEFT adapter directory trained on that model; merged, it
            costs nothing at generation time.
        device (`str`, *optional*): defaults to CUDA when available, else the CPU.
    """
    name = str(model_name_or_path)
    if not Path(name).exists() and not looks_like_hub_id(name):
        raise FileNotFoundError(f"--model {name}: no such checkpoint directory")
    try:
        model, tokenizer = load_janus(name)
    except OSError as err:
        raise FileNotFoundError(f"--model {name}: no checkpoint could be loaded there ({err})") from err
    if adapter is not None:
        model = attach_adapter(model, adapter).merge_and_unload()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tokenizer


def load_trained(path: str | os.PathLike, base: str | os.PathLike | None = None, device: str = "cpu"):
    """A trained run's model and tokenizer for scoring (the demo's and the study's): the full checkpoint at `path`,
    or `base` with the LoRA adapter at `path` merged in."""
    path = Path(path)
    if not (path / "adapter_config.json").exists():
        return load_model(path, device=device)
    if base is None:
        raise ValueError(f"{path} holds a LoRA adapter: pass the model it was trained on as `base`")
    return load_model(base, adapter=path, device=device)


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
