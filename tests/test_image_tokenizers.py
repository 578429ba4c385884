import numpy as np
import pytest
import torch
from PIL import Image

from echogen_rl.models.image_tokenizers import JanusVQTokenizer, PaletteTokenizer
from echogen_rl.models.palette import PALETTE


def test_palette_round_trip_is_exact():
    tok = PaletteTokenizer(grid_size=8, patch_size=4)
    codes = torch.randint(0, len(PALETTE), (5, 64), generator=torch.Generator().manual_seed(0))
    images = tok.decode(codes)
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    assert torch.equal(tok.encode(images), codes)


def test_palette_encode_is_robust_to_noise_and_resizes():
    tok = PaletteTokenizer(grid_size=8, patch_size=4)
    codes = torch.randint(0, len(PALETTE), (3, 64), generator=torch.Generator().manual_seed(1))
    rng = np.random.default_rng(0)
    noisy = []
    for im in tok.decode(codes):
        a = np.asarray(im, dtype=np.int16) + rng.integers(-20, 21, size=(32, 32, 3))
        noisy.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).resize((64, 64), Image.NEAREST))
    assert torch.equal(tok.encode(noisy), codes)


def test_palette_decode_rejects_bad_codes():
    tok = PaletteTokenizer()
    with pytest.raises(ValueError, match=r"shape \[B, 64\]"):
        tok.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="code 99"):
        tok.decode(torch.full((1, 64), 99))
    with pytest.raises(TypeError, match="image 1"):
        tok.encode([Image.new("RGB", (32, 32)), "not an image"])


def test_janus_vq_tokenizer_encodes_and_decodes_in_batches(tiny_model):
    full = JanusVQTokenizer.from_model(tiny_model, batch_size=16)
    small = JanusVQTokenizer.from_model(tiny_model, batch_size=2)
    assert (full.grid_size, full.image_size, full.codebook_size) == (8, 32, len(PALETTE))
    rng = np.random.default_rng(0)
    # Non-square inputs of other sizes are resized on the shorter side and center-cropped.
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(5)]
    codes = full.encode(images)
    assert codes.shape == (5, 64) and codes.dtype == torch.long
    assert torch.equal(codes, small.encode(images))
    decoded = small.decode(codes)
    assert len(decoded) == 5 and decoded[0].size == (32, 32)
    # Decoding is the model's own decoder.
    pixels = tiny_model.decode_image_tokens(codes[:1])
    expected = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].numpy()
    assert np.array_equal(np.asarray(decoded[0]), expected)
