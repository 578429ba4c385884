"""FID: agreement with torchmetrics' `FrechetInceptionDistance` on the same tensors and the same extractor, the
statistics, the preprocessing, and the errors. The Inception extractor itself needs torch-fidelity and
torchvision, absent from the CPU test environment: only its two errors are checked here."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from echogen_rl.eval.benchmarks.fid import (
    INCEPTION_WEIGHTS_FILE,
    FeatureStats,
    compute_fid,
    frechet_distance,
    inception_extractor,
    prepare_images,
)

RESOLUTION = 32


class TinyExtractor(torch.nn.Module):
    """A fixed random conv net with global average pooling: uint8 `[N, 3, H, W]` -> `[N, 16]`. Two nonlinear
    layers so the 16 features are not a linear function of the mean colour (their covariance has full rank)."""

    num_features = 16

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 16, 5, stride=2)
        self.conv2 = torch.nn.Conv2d(16, 16, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator) * 0.5

    def forward(self, x):
        x = x.to(self.conv1.weight.dtype) / 255
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return x.mean(dim=(2, 3))


def make_images(n, seed, size=(40, 36)):
    """Structured images: a random colour gradient plus a random rectangle plus pixel noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    images = []
    for _ in range(n):
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(-120, 120, 3)
        arr = rng.uniform(40, 200, 3) + ramp + rng.normal(0, 20, (h, w, 3))
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, 3)
        images.append(np.clip(arr, 0, 255).astype(np.uint8))
    return images


def to_pil(arrays):
    return [Image.fromarray(a) for a in arrays]


@pytest.fixture(scope="module")
def image_sets():
    return to_pil(make_images(24, seed=1)), to_pil(make_images(20, seed=2))


def test_matches_torchmetrics(image_sets):
    from torchmetrics.image.fid import FrechetInceptionDistance

    generated, real = image_sets
    extractor = TinyExtractor().double()
    ours = compute_fid(generated, real, extractor, resolution=RESOLUTION, batch_size=7, progress=False)

    metric = FrechetInceptionDistance(feature=extractor, normalize=False)  # custom module: uint8 in, unchanged
    metric.set_dtype(torch.float64)
    metric.update(prepare_images(real, RESOLUTION), real=True)
    metric.update(prepare_images(generated, RESOLUTION), real=False)
    reference = metric.compute()

    assert reference.dtype == torch.float64
    assert ours["fid"] > 1e-3  # the sets differ: a comparison of two near-zero numbers would prove little
    assert ours["fid"] == pytest.approx(reference.item(), rel=1e-4)
    assert ours | {"fid": None} == {
        "fid": None,
        "num_generated": 24,
        "num_real": 20,
        "resolution": RESOLUTION,
        "feature_dim": 16,
    }


def test_same_set_is_zero_and_shift_costs_more_than_noise(image_sets):
    _, real = image_sets
    arrays = [np.asarray(im).astype(np.float64) for im in real]
    rng = np.random.default_rng(3)
    perturbed = to_pil([np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8) for a in arrays])
    shifted = to_pil([np.clip(a * 0.6 + 90, 0, 255).astype(np.uint8) for a in arrays])

    def fid(other):
        return compute_fid(other, real, TinyExtractor(), resolution=RESOLUTION, progress=False)["fid"]

    assert abs(fid(real)) < 1e-6
    mild, strong = fid(perturbed), fid(shifted)
    assert 0 < mild < strong
    assert strong > 10 * mild


def test_batch_size_does_not_change_result(image_sets):
    generated, real = image_sets
    extractor = TinyExtractor()
    small = compute_fid(generated, real, extractor, resolution=RESOLUTION, batch_size=3, progress=False)
    large = compute_fid(generated, real, extractor, resolution=RESOLUTION, batch_size=32, progress=False)
    assert small["fid"] == pytest.approx(large["fid"], rel=1e-9)


def test_feature_stats_match_torch_cov_over_uneven_batches():
    features = torch.randn(23, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    stats = FeatureStats()
    for chunk in features.split([1, 9, 13]):
        stats.update(chunk.float())
    mean, cov = stats.mean_cov()
    expected = features.float().double()  # the float32 batches, as fed
    torch.testing.assert_close(mean, expected.mean(dim=0))
    torch.testing.assert_close(cov, torch.cov(expected.T))  # unbiased: divides by N - 1
    with pytest.raises(ValueError, match="4 dimensions; earlier batches had 5"):
        stats.update(torch.zeros(2, 4))


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # Commuting covariances: FID = |mu1 - mu2|^2 + sum((sqrt(s1) - sqrt(s2))^2).
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 5.0 + (1 + 1 + 0)
    assert frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu1, torch.diag(s1), mu2, torch.eye(4))


def test_prepare_images_center_crops_then_resizes(tmp_path):
    # 40 wide, 20 high: red borders of 10 columns each side, the centre square green (left) and blue (right).
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10] = arr[:, 30:] = (255, 0, 0)
    arr[:, 10:20] = (0, 255, 0)
    arr[:, 20:30] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)

    same_size = prepare_images([Image.fromarray(arr), path], resolution=20)
    assert same_size.shape == (2, 3, 20, 20) and same_size.dtype == torch.uint8
    assert torch.equal(same_size[0], same_size[1])  # a path reads as the image it holds
    assert np.array_equal(same_size[0].permute(1, 2, 0).numpy(), arr[:, 10:30])

    small = prepare_images([Image.fromarray(arr)], resolution=8)[0].int()
    assert small.shape == (3, 8, 8)
    assert (small[0] == 0).all()  # no red: the borders were cropped away, not squeezed in
    assert (small[1, :, :3] > 200).all() and (small[2, :, :3] < 50).all()
    assert (small[2, :, 5:] > 200).all() and (small[1, :, 5:] < 50).all()
    # Bicubic on the cropped square, exactly as PIL does it (nearest or bilinear would differ at the edge).
    bicubic = Image.fromarray(arr[:, 10:30]).resize((8, 8), Image.Resampling.BICUBIC)
    assert np.array_equal(small.permute(1, 2, 0).numpy(), np.asarray(bicubic))

    gray = prepare_images([Image.new("L", (5, 7), 100)], resolution=4)
    assert gray.shape == (1, 3, 4, 4) and (gray == 100).all()


def test_prepare_images_names_unreadable_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(OSError, match=r"image 1: .*broken\.png"):
        prepare_images([Image.new("RGB", (4, 4)), broken], resolution=4)


def test_fewer_than_two_images_names_the_set(image_sets):
    generated, real = image_sets
    with pytest.raises(ValueError, match="generated has 1 image"):
        compute_fid(generated[:1], real, TinyExtractor(), resolution=RESOLUTION, progress=False)
    with pytest.raises(ValueError, match="real has 0 image"):
        compute_fid(generated, [], TinyExtractor(), resolution=RESOLUTION, progress=False)


def test_inception_extractor_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / INCEPTION_WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match=r"nowhere.*weights-inception-2015-12-05-6726825d\.pth"):
        inception_extractor(missing)

    # The file is there but the packages are not: `None` in sys.modules makes the import fail wherever this runs.
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match=r"pip install 'echogen-rl\[eval\]'"):
        inception_extractor(weights)
