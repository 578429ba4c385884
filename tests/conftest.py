import os

# Tests never reach a hub: everything loads from checkpoints built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # two xdist workers on two cores


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny Janus checkpoint, built once per test session (per xdist worker)."""
    from echogen_rl.models.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-janus")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture
def tiny_model(tiny_checkpoint):
    """A fresh model per test: tests may train it."""
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


def randomize_(model, std: float = 0.2, seed: int = 0):
    """Redraws the weights with a larger scale: a freshly initialized tiny model predicts almost uniform
    distributions, whose argmax is one code everywhere; parity tests need outputs that vary."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def noisy_model(tiny_model):
    return randomize_(tiny_model)


@pytest.fixture(scope="session")
def prompts(tiny_tokenizer):
    from echogen_rl.models.prompts import PromptBuilder

    return PromptBuilder(tiny_tokenizer, num_image_tokens=64)
