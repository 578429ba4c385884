import importlib.util
import os
from pathlib import Path

# Tests never reach a hub: everything loads from checkpoints built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # two xdist workers on two cores

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture
def benchmark_script(monkeypatch):
    """Loads a benchmark script as a module: `benchmark_script("cyclerl_signal")`. The scripts run from `benchmarks/`,
    beside the modules they import (`common.py`, each other), so that folder is on the path for the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


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
