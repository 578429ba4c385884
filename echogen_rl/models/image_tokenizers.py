"""Image tokenizers: images <-> grids of discrete codes, the one visual vocabulary of both tasks.

Two implementations behind one interface:

- `JanusVQTokenizer`: the model's own `JanusVQVAE` (Janus-Pro: 384 px -> 24 x 24 = 576 codes of 16384).
- `PaletteTokenizer`: the shapes world's exact tokenizer (each cell -> the index of its palette color).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from echogen_rl.models.palette import PALETTE


class ImageTokenizer(ABC):
    """Maps RGB images to row-major code grids `[B, grid_size**2]` and back.

    Attributes:
        codebook_size (`int`): number of distinct codes (the size of the model's image vocabulary).
        grid_size (`int`): codes per side.
        image_size (`int`): pixels per side of the images it encodes and decodes.
    """

    codebook_size: int
    grid_size: int
    image_size: int

    @property
    def num_codes(self) -> int:
        return self.grid_size * self.grid_size

    @property
    @abstractmethod
    def cache_key(self) -> str:
        """Identifies what the tokenizer computes: two tokenizers with the same key give the same codes, so cached
        codes are reused across models that share it (e.g. PMTP and DJO checkpoints share the frozen VQ model)."""

    @abstractmethod
    def encode(self, images: Sequence[Image.Image]) -> torch.LongTensor:
        """Encodes images to codes of shape `[len(images), num_codes]`."""

    @abstractmethod
    def decode(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> list[Image.Image]:
        """Decodes codes of shape `[B, num_codes]` to RGB images of `image_size` pixels."""

    def _check_codes(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> torch.LongTensor:
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim == 1:
            codes = codes.unsqueeze(0)
        if codes.ndim != 2 or codes.shape[1] != self.num_codes:
            raise ValueError(
                f"{type(self).__name__}.decode: expected codes of shape [B, {self.num_codes}], got {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            bad = codes[(codes < 0) | (codes >= self.codebook_size)][0].item()
            raise ValueError(f"{type(self).__name__}.decode: code {bad} is outside [0, {self.codebook_size})")
        return codes


def _to_rgb(image: Image.Image, index: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {index}: expected a PIL.Image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class PaletteTokenizer(ImageTokenizer):
    """Exact tokenizer of palette images: each `patch_size` cell becomes the index of its nearest palette color.

    Args:
        grid_size (`int`, *optional*, defaults to `8`): cells per side.
        patch_size (`int`, *optional*, defaults to `4`): pixels per cell side.
        palette (`Sequence[tuple[int, int, int]]`, *optional*, defaults to the shapes palette):
            RGB colors; code `i` is `palette[i]`.
    """

    def __init__(self, grid_size: int = 8, patch_size: int = 4, palette: Sequence[tuple[int, int, int]] = PALETTE):
        if grid_size < 1 or patch_size < 1:
            raise ValueError(f"grid_size and patch_size must be >= 1, got {grid_size} and {patch_size}")
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.image_size = grid_size * patch_size
        self.palette = np.asarray(palette, dtype=np.float32)
        self.codebook_size = len(self.palette)

    def encode(self, images: Sequence[Image.Image]) -> torch.LongTensor:
        g, p = self.grid_size, self.patch_size
        arrays = []
        for i, image in enumerate(images):
            image = _to_rgb(image, i)
            if image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.NEAREST)
            arrays.append(np.asarray(image, dtype=np.float32))
        if not arrays:
            return torch.zeros(0, self.num_codes, dtype=torch.long)
        # Mean color of each cell, then the nearest palette entry: exact on rendered shapes, robust to noise.
        cells = np.stack(arrays).reshape(len(arrays), g, p, g, p, 3).mean(axis=(2, 4))
        dist = ((cells[..., None, :] - self.palette) ** 2).sum(-1)
        return torch.from_numpy(dist.argmin(-1).reshape(len(arrays), -1)).long()

    @property
    def cache_key(self) -> str:
        return f"palette-{self.grid_size}-{self.patch_size}-{hashlib.sha256(self.palette.tobytes()).hexdigest()[:16]}"

    def decode(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> list[Image.Image]:
        codes = self._check_codes(codes)
        g, p = self.grid_size, self.patch_size
        rgb = self.palette.astype(np.uint8)[codes.numpy()].reshape(-1, g, g, 3)
        rgb = rgb.repeat(p, axis=1).repeat(p, axis=2)
        return [Image.fromarray(a, "RGB") for a in rgb]


class JanusVQTokenizer(ImageTokenizer):
    """The Janus VQ-VAE as an image tokenizer (resize the shorter side, center-crop, encode; decode to pixels).

    Pixels are scaled to [-1, 1] (mean 0.5, std 0.5), as the Janus VQ model was trained.

    Args:
        vqmodel (`transformers.JanusVQVAE`): e.g. `model.model.vqmodel` of a `JanusForConditionalGeneration`.
        batch_size (`int`, *optional*, defaults to `16`): images per VQ forward.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over batches of large inputs.
    """

    def __init__(self, vqmodel: torch.nn.Module, batch_size: int = 16, show_progress: bool = True):
        config = vqmodel.config
        self.vqmodel = vqmodel
        self.grid_size = config.num_patches
        self.image_size = config.num_patches * 2 ** (len(config.channel_multiplier) - 1)
        self.codebook_size = config.num_embeddings
        self.batch_size = batch_size
        self.show_progress = show_progress

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs) -> JanusVQTokenizer:
        """The tokenizer of a `JanusForConditionalGeneration` (also when wrapped by PEFT)."""
        from echogen_rl.models.modeling import unwrap_janus

        return cls(unwrap_janus(model).model.vqmodel, **kwargs)

    @cached_property
    def cache_key(self) -> str:
        """A hash of the VQ model's weights and sizes (not of the checkpoint path: every stage's checkpoint carries
        the same frozen VQ model), computed once per tokenizer."""
        digest = hashlib.sha256(f"janus-vq-{self.image_size}-{self.grid_size}-{self.codebook_size}".encode())
        for name, tensor in sorted(self.vqmodel.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _preprocess(self, image: Image.Image, index: int) -> torch.Tensor:
        image = _to_rgb(image, index)
        w, h = image.size
        scale = self.image_size / min(w, h)
        image = image.resize(
            (max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))), Image.BICUBIC
        )
        w, h = image.size
        left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return pixels * 2.0 - 1.0

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.LongTensor:
        param = next(self.vqmodel.parameters())
        out = []
        starts = range(0, len(images), self.batch_size)
        bar = tqdm(starts, desc="VQ encode", disable=not self.show_progress or len(starts) < 4)
        for start in bar:
            batch = torch.stack(
                [self._preprocess(im, start + j) for j, im in enumerate(images[start : start + self.batch_size])]
            )
            tokens = self.vqmodel.encode(batch.to(param.device, param.dtype)).image_tokens
            out.append(tokens.view(batch.shape[0], -1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_codes, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | Sequence[Sequence[int]]) -> list[Image.Image]:
        codes = self._check_codes(codes)
        param = next(self.vqmodel.parameters())
        images = []
        for start in range(0, codes.shape[0], self.batch_size):
            pixels = self.vqmodel.decode(codes[start : start + self.batch_size].to(param.device)).float()
            pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            images.extend(Image.fromarray(a, "RGB") for a in pixels)
        return images
