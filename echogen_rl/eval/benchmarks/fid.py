"""FID between generated images and the real images of the same split, at one stated resolution.

Both sets go through the same preprocessing (`prepare_images`: RGB, center crop to a square, bicubic resize to
`resolution`) and the same feature extractor; the distance is computed as torchmetrics' `FrechetInceptionDistance`
computes it, so a number from here and one from torchmetrics on the same tensors agree. The standard extractor is
`inception_extractor` (torch-fidelity's Inception-v3, weights read from a local file); any `nn.Module` mapping
uint8 `[N, 3, H, W]` to `[N, D]` features can stand in for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# The file torch-fidelity downloads for "inception-v3-compat"; we never download it, so the error names it.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE

ImageLike = Image.Image | str | os.PathLike


def _load_rgb(image: ImageLike, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        # `convert` inside the `try`: `Image.open` is lazy, and a truncated file only fails when decoded.
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except OSError as err:
        raise OSError(f"image {index}: cannot read image file {os.fspath(image)!r}: {err}") from err


def prepare_images(images: Sequence[ImageLike], resolution: int) -> torch.Tensor:
    """The one preprocessing applied to both sets: RGB, center crop to a square, bicubic resize.

    Cropping before resizing keeps the aspect ratio: a squashed image would move FID for a reason that has
    nothing to do with the generator.

    Args:
        images (`Sequence[PIL.Image.Image | str | os.PathLike]`): the images, or paths to image files.
        resolution (`int`): the side of the output square, in pixels.

    Returns:
        `torch.Tensor`: uint8 of shape `[N, 3, resolution, resolution]`.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    out = torch.empty(len(images), 3, resolution, resolution, dtype=torch.uint8)
    for i, image in enumerate(images):
        rgb = _load_rgb(image, i)
        width, height = rgb.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = rgb.crop((left, top, left + side, top + side))
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
        out[i] = torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)
    return out


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between two Gaussians, in float64, as torchmetrics' `_compute_fid` computes it.

    `||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 * sum(sqrt(eigvals(sigma1 @ sigma2)))`: the trace of the
    matrix square root is taken from the eigenvalues of the product, not from `scipy.linalg.sqrtm`. Rounding can
    leave a value a hair below zero for identical statistics; it is returned as is, as torchmetrics does.

    Args:
        mu1 (`torch.Tensor` or array): mean of the first set, shape `[D]`.
        sigma1 (`torch.Tensor` or array): covariance of the first set, shape `[D, D]`.
        mu2 (`torch.Tensor` or array): mean of the second set, shape `[D]`.
        sigma2 (`torch.Tensor` or array): covariance of the second set, shape `[D, D]`.

    Returns:
        `float`: the distance. The formula is symmetric in the two sets.
    """
    mu1, mu2 = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(v, dtype=torch.float64).cpu() for v in (sigma1, sigma2))
    if mu1.dim() != 1:
        raise ValueError(f"mu1 must have shape [D], got {tuple(mu1.shape)}")
    dim = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}; mu1 has {dim} dimensions, so expected {shape}")
    a = (mu1 - mu2).square().sum()
    b = sigma1.trace() + sigma2.trace()
    c = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float(a + b - 2 * c)


class FeatureStats:
    """Running mean and covariance of features, from float64 sums of the features and of their outer products.

    The same sums torchmetrics keeps, so the statistics do not depend on how the features were batched beyond
    float64 rounding, and nothing but two `[D]`/`[D, D]` tensors is held however many images pass.
    """

    def __init__(self):
        self.num = 0
        self.sum: torch.Tensor | None = None
        self.outer_sum: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        """Adds a batch of features.

        Args:
            features (`torch.Tensor`): shape `[N, D]`; cast to float64 on the CPU before summing.
        """
        if features.dim() != 2:
            raise ValueError(f"features must have shape [N, D], got {tuple(features.shape)}")
        features = features.detach().to("cpu", torch.float64)
        if self.sum is None:
            dim = features.shape[1]
            self.sum = torch.zeros(dim, dtype=torch.float64)
            self.outer_sum = torch.zeros(dim, dim, dtype=torch.float64)
        elif features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features have {features.shape[1]} dimensions; earlier batches had {self.sum.shape[0]}")
        self.num += features.shape[0]
        self.sum += features.sum(dim=0)
        self.outer_sum += features.T @ features

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean `[D]` and the unbiased covariance `[D, D]` (divided by `N - 1`, as torchmetrics), in float64."""
        if self.num < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.num}")
        mean = self.sum / self.num
        cov = (self.outer_sum - self.num * torch.outer(mean, mean)) / (self.num - 1)
        return mean, cov


def compute_fid(
    generated: Sequence[ImageLike],
    real: Sequence[ImageLike],
    extractor: torch.nn.Module,
    resolution: int = 299,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """FID between generated and real images, both prepared by `prepare_images` at `resolution`.

    Args:
        generated (`Sequence[PIL.Image.Image | str | os.PathLike]`): the generated images, or their paths.
        real (`Sequence[PIL.Image.Image | str | os.PathLike]`): the real images of the same split, or their paths.
        extractor (`torch.nn.Module`): maps uint8 `[N, 3, H, W]` to `[N, D]` features (torchmetrics' convention
            for a custom `feature=`), e.g. `inception_extractor(...)`. It is moved to `device` and put in eval mode.
        resolution (`int`, *optional*, defaults to `299`): the side images are resized to before extraction.
        batch_size (`int`, *optional*, defaults to `32`): images prepared and extracted at once.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the extractor runs.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over both sets.

    Returns:
        `dict`: `fid`, `num_generated`, `num_real`, `resolution`, `feature_dim`.
    """
    for name, images in (("generated", generated), ("real", real)):
        if len(images) < 2:
            raise ValueError(f"{name} has {len(images)} image(s); FID needs at least 2 per set (a covariance)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # Moved outside inference mode: parameters created inside it could not be used with autograd afterwards.
    extractor = extractor.to(device).eval()
    stats = {"generated": FeatureStats(), "real": FeatureStats()}
    total = len(generated) + len(real)
    with torch.inference_mode(), tqdm(total=total, desc="FID features", unit="img", disable=not progress) as bar:
        for name, images in (("generated", generated), ("real", real)):
            for start in range(0, len(images), batch_size):
                batch = prepare_images(images[start : start + batch_size], resolution)
                features = extractor(batch.to(device))
                if features.dim() != 2 or features.shape[0] != batch.shape[0]:
                    raise ValueError(
                        f"extractor returned shape {tuple(features.shape)} for {batch.shape[0]} images; "
                        "expected [N, D] features"
                    )
                stats[name].update(features)
                bar.update(batch.shape[0])
    mu_real, sigma_real = stats["real"].mean_cov()
    mu_gen, sigma_gen = stats["generated"].mean_cov()
    # Real first, as torchmetrics orders them; the value is the same either way.
    fid = frechet_distance(mu_real, sigma_real, mu_gen, sigma_gen)
    result = {
        "fid": fid,
        "num_generated": len(generated),
        "num_real": len(real),
        "resolution": resolution,
        "feature_dim": int(mu_real.shape[0]),
    }
    logger.info("FID %.4f (%d generated, %d real, %dpx)", fid, len(generated), len(real), resolution)
    return result


def inception_extractor(weights_path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The standard FID feature extractor: Inception-v3 ("inception-v3-compat"), 2048-d pool features.

    torchmetrics' `NoTrainInceptionV3`, built on torch-fidelity's port of the TensorFlow graph: it takes uint8
    `[N, 3, H, W]`, resizes to 299 itself and never leaves eval mode. Weights come from a local file only.

    Args:
        weights_path (`str` or `os.PathLike`): torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`): where the module is placed.

    Returns:
        `torch.nn.Module`: the extractor, with `num_features = 2048`.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {str(path)!r}: expected torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
            f"({INCEPTION_WEIGHTS_URL})"
        )
    try:
        # torch-fidelity imports torchvision; a torchvision built for another torch can fail with a RuntimeError.
        import torch_fidelity  # noqa: F401
        from torchmetrics.image.fid import NoTrainInceptionV3
    except (ImportError, RuntimeError) as err:
        raise ImportError(
            f"the Inception extractor needs torchmetrics, torch-fidelity and torchvision ({err}); "
            "install them with `pip install 'echogen-rl[eval]'`"
        ) from err
    model = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
    )
    model.num_features = 2048  # what torchmetrics reads to size its state when given this module as `feature=`
    return model.to(device)
