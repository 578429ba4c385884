"""Published Janus-Pro architectures, shipped as `JanusConfig` JSON, and random-init checkpoints of them.

[`resolve_architecture`] tells a run's architecture from its `model_name_or_path` with no hub access (a local
checkpoint, a known hub id, or the shipped config whose output it is); [`write_random_checkpoint`] writes a
random-init checkpoint of it that loads like the real one. The dry run (`echogen_rl/experiments/dry_run.py`) uses both.

`janus_pro_1b.json` and `janus_pro_7b.json` are the configs of the transformers checkpoints
`deepseek-community/Janus-Pro-1B` and `-7B`. Where the values come from:

- 1B: the converted 1B config as transformers writes it (text: Llama, hidden 2048, 24 layers, 16 heads and KV
  heads, head_dim 128, intermediate 5632, vocab 102400, 16384 positions, RMS eps 1e-6, rope theta 10000;
  vision: SigLIP-L/16 at 384 px, 576 image tokens, aligner depth 2 to 2048).
- 7B: deepseek-ai/Janus-Pro-7B's `config.json` (language: 30 layers, vocab 102400, 16384 positions, the rest
  Llama defaults: hidden 4096, 32 heads, intermediate 11008; aligner 1024 -> 4096 depth 2; generation aligner
  8 -> 4096 depth 2; generation head 4096 -> 16384 codes; VQ-16 with 8-wide codes), mapped onto `JanusConfig` as
  transformers' conversion script does.
- Both: the VQ model's layout (base channels 128, multipliers 1, 1, 2, 2, 4, 2 residual blocks, 256 latent
  channels) is `JanusVQVAEConfig`'s defaults, which the conversion script keeps; the text head is untied from the
  input embeddings, as in DeepSeek-LLM (the 1B model then has 2.08B parameters).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import JanusConfig, JanusForConditionalGeneration, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from echogen_rl.models.loading import producing_config
from echogen_rl.models.tiny import (
    BOI_TOKEN,
    IMAGE_TOKEN,
    build_tiny_checkpoint,
    build_tiny_tokenizer,
    janus_generation_config,
)

ARCHITECTURES_DIR = Path(__file__).parent
# The shipped configs are package data (`recipes/configs` in the repository points to them).
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "scripts" / "configs"
HUB_IDS = {
    "deepseek-community/Janus-Pro-1B": "janus_pro_1b",
    "deepseek-community/Janus-Pro-7B": "janus_pro_7b",
}


def config_name(path: str | Path) -> str:
    """How a result file names a config: relative to the repository when it is a shipped one, never a machine's
    absolute path."""
    path = Path(path)
    try:
        return str(Path("recipes/configs") / path.resolve().relative_to(SHIPPED_CONFIGS.resolve()))
    except ValueError:
        return str(path)


def shipped_architectures() -> list[str]:
    """Names of the shipped architectures, e.g. `["janus_pro_1b", "janus_pro_7b"]`."""
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


def load_architecture(name: str) -> JanusConfig:
    """The `JanusConfig` of a shipped architecture, by name (`janus_pro_1b`) or hub id.

    Raises:
        `ValueError`: if `name` is neither.
    """
    name = HUB_IDS.get(name, name)
    path = ARCHITECTURES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown architecture {name!r}; shipped: {', '.join(shipped_architectures())}")
    return JanusConfig.from_dict(json.loads(path.read_text()))


def _random_fill_(model: torch.nn.Module, std: float, seed: int) -> None:
    """Norms to identity, biases to zero, every other weight from one shared pool of N(0, std) values.

    Drawing two billion normals takes half a minute on one core; copying windows of a million-value pool, at a
    random offset per tensor, takes a few seconds. Only the scale matters to a dry run, not the values.
    """
    gen = torch.Generator().manual_seed(seed)
    size = 1_000_003  # prime: tensors whose width divides the pool size would repeat their rows
    pool = torch.randn(size, generator=gen).mul_(std)
    pool = torch.cat([pool, pool])  # any window of `size` values is contiguous
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()  # LayerNorm, GroupNorm, LlamaRMSNorm
            for name, param in module.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    param.fill_(1.0)
                elif param.ndim < 2:
                    param.zero_()
                else:
                    flat = param.view(-1)
                    offset = int(torch.randint(size, (1,), generator=gen))
                    for start in range(0, flat.numel(), size):
                        count = min(size, flat.numel() - start)
                        flat[start : start + count].copy_(pool[offset : offset + count])


def build_random_checkpoint(
    config: JanusConfig,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """Writes a randomly initialized `JanusForConditionalGeneration` of `config`, with `tokenizer`, to `output_dir`.

    The config's special token ids are set to the tokenizer's, so every id it makes is a row of the embeddings.

    Args:
        config (`JanusConfig`): the architecture; not modified.
        tokenizer (`PreTrainedTokenizerBase`): saved with the model; needs `len(tokenizer) <= vocab_size`.
        output_dir (`str` or `os.PathLike`): where to write.
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): the dtype of the stored weights.
        seed (`int`, *optional*, defaults to `0`): seed of the weights.

    Returns:
        `Path`: the checkpoint directory.
    """
    config = JanusConfig.from_dict(config.to_dict())
    text = config.text_config
    if len(tokenizer) > text.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size={text.vocab_size}")
    text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer.convert_tokens_to_ids(BOI_TOKEN) == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {BOI_TOKEN} token")
    # Allocate without running the initializers (minutes at 7B), in the stored dtype (half the memory of float32).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = JanusForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    _random_fill_(model, text.initializer_range, seed)
    model.generation_config = janus_generation_config(tokenizer)
    out = Path(output_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@dataclass
class Architecture:
    """The model a dry run builds: `config` (`None`: the offline tiny checkpoint), found as `source` says, through
    the shipped configs in `via` (each makes the start checkpoint of the one before)."""

    config: JanusConfig | None
    source: str
    via: list[str] = field(default_factory=list)


def _producer(path: str, config_dirs: list[Path]) -> Path | None:
    return next(filter(None, (producing_config(path, root) for root in config_dirs)), None)


def resolve_architecture(
    model_name_or_path: str,
    build_tiny_if_missing: bool = False,
    config_dirs: list[Path] | None = None,
    architecture: str | None = None,
) -> Architecture:
    """The architecture of a run's start checkpoint, with no hub access.

    A local checkpoint gives its own config; a known hub id the shipped JSON; a missing path with
    `build_tiny_if_missing` the tiny checkpoint; any other missing path is followed back through the config (under
    `config_dirs`, default `recipes/configs`) that writes it as `output_dir`, to that run's start checkpoint.

    Args:
        architecture (`str`, *optional*): use this instead: a shipped name (`janus_pro_1b`), `tiny`, or a
            checkpoint folder or `config.json`.
    """
    if architecture is not None:
        path = Path(architecture)
        if architecture == "tiny":
            return Architecture(None, "the offline tiny Janus (--architecture)")
        if path.exists():
            config = JanusConfig.from_json_file(path) if path.is_file() else JanusConfig.from_pretrained(path)
            return Architecture(config, f"{path} (--architecture)")
        return Architecture(load_architecture(architecture), f"shipped {architecture} (--architecture)")
    config_dirs = config_dirs or [SHIPPED_CONFIGS]
    model, tiny, via = model_name_or_path, build_tiny_if_missing, []
    while True:
        if (Path(model) / "config.json").is_file():
            return Architecture(JanusConfig.from_pretrained(model), f"the local checkpoint {model}", via)
        if model in HUB_IDS:
            return Architecture(load_architecture(model), f"{model} (architectures/{HUB_IDS[model]}.json)", via)
        if tiny:
            return Architecture(None, f"the offline tiny Janus ({model}, build_tiny_if_missing)", via)
        producer = _producer(model, config_dirs)
        if producer is None or config_name(producer) in via:
            raise ValueError(
                f"cannot tell the architecture of {model!r}: no local checkpoint, no known hub id ({', '.join(HUB_IDS)}) "
                f"and no config under {', '.join(map(str, config_dirs))} writes it as output_dir; pass "
                f"--architecture {'|'.join(shipped_architectures())}|tiny|PATH"
            )
        via.append(config_name(producer))  # a shipped config by its repository path, never this machine's
        values = yaml.safe_load(producer.read_text()) or {}
        model, tiny = str(values.get("model_name_or_path")), bool(values.get("build_tiny_if_missing", False))


def write_random_checkpoint(arch: Architecture, output_dir: Path) -> Path:
    """A random-init checkpoint of `arch` with a word-level tokenizer padded to its vocabulary, in `output_dir`."""
    if arch.config is None:
        return build_tiny_checkpoint(output_dir)
    dtype = arch.config.dtype or torch.float32
    # Stored as the real start checkpoint is (Janus-Pro: bfloat16, half the disk); the recipe then loads it with
    # the config's own `dtype`, as a user's run loads the real one.
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = build_tiny_tokenizer(arch.config.text_config.vocab_size)
    return build_random_checkpoint(arch.config, tokenizer, output_dir, dtype)
