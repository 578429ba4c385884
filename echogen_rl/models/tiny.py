"""An offline tiny Janus checkpoint: the real architecture at toy size, for tests and the CPU demo.

`build_tiny_checkpoint(dir)` writes a directory that loads like any hub checkpoint, with no network:

    model = JanusForConditionalGeneration.from_pretrained(dir)
    tokenizer = AutoTokenizer.from_pretrained(dir)

It holds a `JanusConfig` with a tiny Llama, a tiny real `JanusVQVAE` whose codebook and generation head
are sized to the shapes palette tokenizer, and a word-level tokenizer (tokenizers library) over the
shapes vocabulary, the integers 0..1000 of layout text, the Janus special tokens and the six layout tags.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from echogen_rl.layout import COORD_SCALE, LAYOUT_TAGS
from echogen_rl.models.palette import CAPTION_WORDS, COLOR_NAMES, PALETTE, SHAPES

# Janus-Pro's own spellings, so that prompt code is the same for the tiny model and the real one.
BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
UNK_TOKEN = "<unk>"
USER_TOKEN, ASSISTANT_TOKEN = "<|User|>", "<|Assistant|>"
BOI_TOKEN, EOI_TOKEN, IMAGE_TOKEN = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"
SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_TOKEN,
)
PUNCTUATION = (":", ",", ";", ".", "[", "]", "(", ")", "-", "'", '"', "!", "?")


@dataclass
class TinyJanusConfig:
    """Sizes of the tiny checkpoint.

    Args:
        hidden_size (`int`, *optional*, defaults to `128`): width of the Llama and of the image embeddings.
        num_layers (`int`, *optional*, defaults to `4`): Llama decoder layers.
        num_heads (`int`, *optional*, defaults to `4`): attention heads.
        num_key_value_heads (`int`, *optional*): key/value heads (grouped-query attention when fewer than
            `num_heads`); defaults to `num_heads`.
        intermediate_size (`int`, *optional*, defaults to `256`): Llama MLP width.
        grid_size (`int`, *optional*, defaults to `8`): image codes per side.
        patch_size (`int`, *optional*, defaults to `4`): pixels per code side (VQ downsampling factor).
        codebook_size (`int`, *optional*, defaults to the shapes palette size): image vocabulary.
        max_position_embeddings (`int`, *optional*, defaults to `1024`): longest sequence.
        seed (`int`, *optional*, defaults to `0`): weight initialization seed.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int = 256
    grid_size: int = 8
    patch_size: int = 4
    codebook_size: int = len(PALETTE)
    max_position_embeddings: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.patch_size < 1 or self.patch_size & (self.patch_size - 1):
            raise ValueError(f"TinyJanusConfig.patch_size must be a power of two, got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"TinyJanusConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_heads
        if self.num_key_value_heads < 1 or self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinyJanusConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_heads "
                f"({self.num_heads})"
            )


def tiny_vocabulary() -> list[str]:
    """Every token of the tiny tokenizer, special tokens first (their ids are stable)."""
    words = [*SPECIAL_TOKENS, *LAYOUT_TAGS, *PUNCTUATION, *COLOR_NAMES, *SHAPES, *CAPTION_WORDS]
    words += [str(i) for i in range(COORD_SCALE + 1)]
    return list(dict.fromkeys(words))


def build_tiny_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; every coordinate 0..1000 is one token, as a layout is short that way.

    Args:
        vocab_size (`int`, *optional*): pad the vocabulary with unused filler tokens to this size, e.g. to stand
            in for Janus-Pro's tokenizer (102400) with ids spread over a real-size embedding; by default the
            vocabulary is exactly `tiny_vocabulary()`.
    """
    words = tiny_vocabulary()
    if vocab_size is not None:
        if vocab_size < len(words):
            raise ValueError(f"vocab_size must be at least the {len(words)} tiny tokens, got {vocab_size}")
        words += [f"<filler_{i}>" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    # Special tokens and layout tags are matched whole, before normalization and splitting on punctuation.
    # The tags are not "special": decoding with skip_special_tokens=True must keep the layout readable.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in LAYOUT_TAGS])
    # Like Janus-Pro's tokenizer, plain encoding starts with BOS.
    bos_id = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI_TOKEN, "eoi_token": EOI_TOKEN},
        padding_side="left",
        model_max_length=4096,
    )


def build_tiny_model(config: TinyJanusConfig, tokenizer: PreTrainedTokenizerFast) -> JanusForConditionalGeneration:
    """A randomly initialized `JanusForConditionalGeneration` at tiny size."""
    h = config.hidden_size
    vq_levels = config.patch_size.bit_length()  # downsampling by 2 ** (levels - 1) == patch_size
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=h,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    # The SigLIP understanding path is not used by training; it stays, at minimal size, so that the
    # checkpoint has Janus-Pro's exact module tree. Its image/patch sizes set the VQ grid (num_patches).
    vision_config = JanusVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2.0,
        image_size=config.grid_size * config.patch_size,
        patch_size=config.patch_size,
        projection_dim=h,
        depth=2,
        num_image_tokens=config.grid_size**2,
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=config.codebook_size,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1] * vq_levels,
        num_res_blocks=1,
        projection_dim=h,
        num_hidden_layers=2,
        image_token_embed_dim=h,
    )
    janus_config = JanusConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        vq_config=vq_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(config.seed)
    model = JanusForConditionalGeneration(janus_config)
    # In Janus-Pro the 8-wide generation embeddings are a trained VQ codebook of unit scale. At the default init
    # (std 0.02) every code reaches the language model as nearly the same vector, and a tiny model spends its
    # budget learning to tell codes apart: teacher-forced, it did not even copy a shape's color to the next cell.
    with torch.no_grad():
        model.model.generation_embeddings.weight.normal_(0.0, 1.0)
    model.generation_config = janus_generation_config(tokenizer)
    return model.eval()


def janus_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Janus-Pro's generation settings (the image starts after `<begin_of_image>`) for `tokenizer`'s ids, with no
    CFG: a fresh model has no unconditional branch until PMTP trains one (see `echogen_rl.models.sampling`)."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        guidance_scale=5.0,  # transformers' Janus image generation always runs both branches: it needs a scale > 1
        sampling_guidance_scale=1.0,
        unconditional_branch=False,
        generation_kwargs={"boi_token_id": tokenizer.convert_tokens_to_ids(BOI_TOKEN)},
    )


def build_tiny_checkpoint(
    output_dir: str | os.PathLike, config: TinyJanusConfig | None = None, overwrite: bool = False
) -> Path:
    """Writes the tiny checkpoint to `output_dir` (written to a temporary folder, then renamed into place).

    Args:
        output_dir (`str` or `os.PathLike`): where to write; must not exist or be empty unless `overwrite`.
        config (`TinyJanusConfig`, *optional*): sizes; defaults to `TinyJanusConfig()`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty directory.

    Returns:
        `Path`: the checkpoint directory.
    """
    config = config or TinyJanusConfig()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(config, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tiny_janus.json").write_text(json.dumps(asdict(config), indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is shared like any other folder
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_tiny_checkpoint(path: str | os.PathLike, config: TinyJanusConfig | None = None) -> Path:
    """Returns `path`, building the tiny checkpoint there first if it holds no `config.json`."""
    path = Path(path)
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, config)
    return path
