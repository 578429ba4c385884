"""`echogen-rl dry-run`: a real-size training step of any config on a random-init model, before booking GPUs.

    echogen-rl dry-run --config recipes/configs/pmtp/janus_pro_1b_coco.yaml [--steps N] [--batch-size B] [--json F]
    echogen-rl dry-run --config recipes/configs/pmtp/janus_pro_1b_coco.yaml -- --gradient_checkpointing false

The stage's own recipe runs (`recipes/<stage>.py`: its `main`, on its dataclasses parsed by `RecipeParser`, TRL's
parser with type-checked YAML, from the YAML plus overrides, so a bad YAML fails as the recipe would). Its model is a random-init checkpoint of the config's
architecture with a word-level tokenizer padded to the real vocabulary, written to a temporary folder; its data are
synthetic rows in the config's format where the config's data paths do not exist. Changed from the config, and
listed in the output: the output folder, `max_steps`, the per-device batch, no gradient accumulation, evaluation,
saving or reporting, a few samples, for CycleRL groups of 2; on a CPU also no compiled rollouts, float32 compute
instead of bf16 and, where AdamW's states would not fit in memory, an optimizer without state (see
[`cpu_adjustments`]). The rest (dtype,
bf16, gradient checkpointing, LoRA, optimizer, max_length, ...) is the config's. Fields after `--` override the
config as on the recipe's command line.

It prints, and writes with `--json`, what it measured (step time, tokens per step, memory, parameter counts) and an
estimate of the GPU memory per device at the config's own batch (see
[`echogen_rl.experiments.dry_run_report.estimate_gpu_memory`]); [`echogen_rl.experiments.dry_run_probe`] measures.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import shutil
import tempfile
import time
import typing
from pathlib import Path

import psutil
import torch
import yaml
from transformers import JanusForConditionalGeneration, Trainer
from trl import SFTConfig

from echogen_rl.data.synthetic import synthesize_missing
from echogen_rl.experiments.dry_run_probe import StepProbe, measured, probed
from echogen_rl.experiments.dry_run_report import GIB, estimate_gpu_memory, extrapolate_depth, launch_config
from echogen_rl.experiments.provenance import provenance
from echogen_rl.models.architectures import (
    SHIPPED_CONFIGS,
    Architecture,
    config_name,
    resolve_architecture,
    write_random_checkpoint,
)
from echogen_rl.scripts.runner import as_cli as _as_cli
from echogen_rl.scripts.runner import load_recipe as _load_recipe
from echogen_rl.scripts.runner import parse_recipe_args as _parse
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.pmtp_config import PMTPConfig

logger = logging.getLogger(__name__)

STAGES = {"pmtp": PMTPConfig, "djo": DJOConfig, "cyclerl": CycleRLConfig}


def infer_stage(config_path: str | Path, values: dict, stage: str | None = None) -> str:
    """The stage of a config: `stage` if given, else its folder (`configs/<stage>/`), else the stage whose own
    fields (those its config class adds to `SFTConfig`, e.g. `loop_weight`, `num_generations`) it sets."""
    if stage is not None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {tuple(STAGES)}, got {stage!r}")
        return stage
    if Path(config_path).parent.name in STAGES:
        return Path(config_path).parent.name
    shared = set(SFTConfig.__dataclass_fields__)
    found = [s for s, cls in STAGES.items() if (set(cls.__dataclass_fields__) - shared) & values.keys()]
    if len(found) != 1:
        what = f"fields of {' and '.join(found)}" if found else "no stage-specific field"
        raise ValueError(f"cannot tell the stage of {config_path} ({what}); pass --stage {'|'.join(STAGES)}")
    return found[0]


def dry_run_overrides(stage: str, values: dict, training_args, steps: int, batch_size: int, work: Path) -> dict:
    """The settings a dry run changes, as `{field: value}` (the checkpoint and data paths are added later)."""
    changed = {
        "output_dir": str(work / "output"),
        "max_steps": steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "push_to_hub": False,
        "report_to": "none",
        "logging_steps": 1,
        "num_eval_samples": 0,
        "cache_dir": str(work / "cache"),  # codes of a random VQ model must not land in the user's cache
    }
    if stage == "cyclerl":
        # A group needs 2 images; one generation batch per optimizer step, via the field the config uses.
        changed["num_generations"] = 2
        changed["per_device_train_batch_size"] = 2 * math.ceil(batch_size / 2)
        if "generation_batch_size" in values:
            changed["generation_batch_size"] = changed["per_device_train_batch_size"]
        else:
            changed["steps_per_generation"] = 1
        if training_args.rollout_compile and not torch.cuda.is_available():
            changed["rollout_compile"] = False  # CUDA graphs; compiling on a CPU costs minutes and shows nothing
    rows = changed["per_device_train_batch_size"] * steps
    changed["num_train_samples"] = rows
    if stage == "cyclerl":
        changed["num_random_prompts"] = rows
    if not torch.cuda.is_available():
        changed["use_cpu"] = True
    return changed


def cpu_adjustments(arch, stage: str, training_args, model_args) -> dict:
    """What a dry run on a CPU changes besides the batch, as `{field: value}`; nothing on a GPU.

    - `bf16: false`: CPUs without bf16 units run bf16 matmuls several times slower than float32 (measured here:
      6x, convolutions as in VQ encoding far more), so a bf16 step at 1B takes most of an hour.
    - `optim: sgd` when the weights, gradients and AdamW's two states of the config's training would not fit in
      70% of this machine's memory (full fine-tuning of Janus-Pro-1B in float32: about 27 GiB). The optimizer step
      then allocates no state; the estimate still counts the config's own optimizer.

    Raises:
        ValueError: the weights and gradients alone exceed 85% of this machine's memory (there is no adjustment
            that keeps the config's training), rather than a run killed for memory mid-step.
    """
    if torch.cuda.is_available():
        return {}
    changed = {"bf16": False} if training_args.bf16 else {}
    if arch.config is None or model_args.use_peft:
        return changed
    with torch.device("meta"):  # sizes only
        model = JanusForConditionalGeneration(arch.config)
    frozen = ("model.vision_model.", "model.aligner.", "model.vqmodel.")  # what the trainers freeze
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(frozen))
    size = (
        torch.finfo(getattr(torch, str(model_args.dtype))).bits // 8 if model_args.dtype not in (None, "auto") else 4
    )
    reference = stage == "cyclerl" and training_args.beta > 0
    weights = size * total * (2 if reference else 1)
    memory = psutil.virtual_memory().total
    if weights + 3 * size * trainable > 0.7 * memory and "sgd" not in str(training_args.optim):
        changed["optim"] = "sgd"
    # Weights and gradients cannot be dropped: where they alone fill the machine, the run would be killed for memory
    # in its first backward (measured: the full-fine-tuning CycleRL config, policy and reference in float32, at 24 GiB).
    floor = weights + size * trainable
    if floor > 0.85 * memory:
        raise ValueError(
            f"the weights{' (policy and reference model)' if reference else ''} and gradients alone take "
            f"{floor / GIB:.1f} GiB, more than 85% of this machine's {memory / GIB:.1f} GiB: a CPU dry run would be "
            "killed for memory. Run it on a GPU (benchmarks/gpu_dry_run.sh) or a machine with more memory"
        )
    return changed


def _architecture(config: Path, model_args, architecture: str | None):
    """The architecture of the config's start checkpoint ([`resolve_architecture`]), which may be the output of a
    config beside this one, or of a shipped one."""
    config_dirs = [config.resolve().parent.parent] if config.parent.name in STAGES else []
    config_dirs = list(dict.fromkeys([*config_dirs, SHIPPED_CONFIGS]))
    return resolve_architecture(
        model_args.model_name_or_path, model_args.build_tiny_if_missing, config_dirs, architecture
    )


def _depths(arch, layers) -> list[int] | None:
    """The two depths to run at (see `run_dry_run`'s `layers`), checked against the architecture."""
    if layers is None:
        return None
    depths = sorted(set(layers))
    if arch.config is None:
        raise ValueError("layers: the tiny model runs at its full depth; extrapolating applies to real architectures")
    full = arch.config.text_config.num_hidden_layers
    if len(depths) != 2 or len(layers) != 2 or not all(0 < d < full for d in depths):
        raise ValueError(f"layers: two different depths between 1 and {full - 1} (the model's {full}), got {layers}")
    return depths


def shallower(arch: Architecture, layers: int) -> Architecture:
    """The architecture at its own width with only `layers` decoder layers."""
    config = copy.deepcopy(arch.config)
    full = config.text_config.num_hidden_layers
    config.text_config.num_hidden_layers = layers
    return Architecture(config, f"{arch.source}, {layers} of its {full} decoder layers", list(arch.via))


def _prepare(arch, work: Path, stage: str, values: dict, args: tuple, steps: int, batch_size: int, cpu_changes: dict):
    """Writes the random-init checkpoint and the missing data into `work`; returns what the dry run changes
    (`{field: value}`) and the seconds the checkpoint took (`{"checkpoint_seconds": s}`)."""
    script_args, training_args, _ = args
    logger.info("dry run: random-init checkpoint of %s in %s", arch.source, work)
    clock = time.perf_counter()
    changed = {"model_name_or_path": str(write_random_checkpoint(arch, work / "checkpoint"))}
    phases = {"checkpoint_seconds": time.perf_counter() - clock}
    gc.collect()
    changed.update(dry_run_overrides(stage, values, training_args, steps, batch_size, work))
    changed.update(cpu_changes)
    if stage != "cyclerl" or script_args.prompt_source == "dataset":
        changed.update(synthesize_missing(script_args, work / "data", changed["num_train_samples"]))
    return changed, phases


def _run_probed(recipe, classes: tuple, config: Path, changed: dict, overrides) -> StepProbe:
    """Runs the recipe's `main` on the config with `changed` and `overrides`, its trainer probed; returns the probe."""
    probe = StepProbe()
    name = next(k for k, v in vars(recipe).items() if isinstance(v, type) and issubclass(v, Trainer))
    trainer_cls = getattr(recipe, name)
    setattr(recipe, name, probed(trainer_cls, probe))  # the script module is shared: put it back after
    probe.clock = time.perf_counter()
    try:
        recipe.main(*_parse(classes, config, [*_as_cli(changed), *overrides]))
    finally:
        setattr(recipe, name, trainer_cls)
    return probe


def run_dry_run(
    config: str | Path,
    steps: int = 1,
    batch_size: int = 1,
    stage: str | None = None,
    architecture: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    json_path: str | Path | None = None,
    work_dir: str | Path | None = None,
    layers: typing.Sequence[int] | None = None,
) -> dict:
    """Runs `steps` steps of `config`'s recipe on a random-init real-size model and returns the report.

    Args:
        config (`str` or `Path`): a stage's YAML config.
        steps (`int`, *optional*, defaults to `1`): optimizer steps.
        batch_size (`int`, *optional*, defaults to `1`): per-device batch (CycleRL: rounded up to groups of 2).
        stage (`str`, *optional*): `pmtp`, `djo` or `cyclerl`; by default read from the config's folder or fields.
        architecture (`str`, *optional*): see [`resolve_architecture`].
        overrides (`list[str]`, *optional*): config fields as on the recipe's command line, applied last.
        json_path (`str` or `Path`, *optional*): also write the report there as JSON.
        work_dir (`str` or `Path`, *optional*): parent of the temporary folder (checkpoint, data, output).
        layers (`Sequence[int]`, *optional*): two depths, e.g. `(1, 2)`: run the architecture at its own width but
            with only that many decoder layers, once per depth, and extrapolate what was measured to its full depth
            ([`extrapolate_depth`]), for a model whose full depth does not fit this machine (Janus-Pro-7B on a CPU).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    config = Path(config)
    values = yaml.safe_load(config.read_text()) or {}
    stage = infer_stage(config, values, stage)
    recipe = _load_recipe(stage, config)
    hints = typing.get_type_hints(recipe.main)
    classes = tuple(hints[name] for name in ("script_args", "training_args", "model_args"))
    # The run as the user would launch it (on a CPU-only machine, TrainingArguments refuses bf16 without use_cpu).
    cpu = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    args = _parse(classes, config, [*cpu, *overrides])
    _, training_args, model_args = args
    arch = _architecture(config, model_args, architecture)
    depths = _depths(arch, layers)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    runs, works = [], []
    for depth in depths or [None]:
        arch_run = arch if depth is None else shallower(arch, depth)
        cpu_changes = cpu_adjustments(arch_run, stage, training_args, model_args)
        work = Path(tempfile.mkdtemp(prefix="echogen-dry-run-", dir=work_dir))
        works.append(work)
        try:
            changed, phases = _prepare(arch_run, work, stage, values, args, steps, batch_size, cpu_changes)
            probe = _run_probed(recipe, classes, config, changed, overrides)
            phases["setup_seconds"] = probe.setup_seconds  # loading, data (VQ encoding), trainer
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append((depth, measured(probe, phases, changed["per_device_train_batch_size"])))
        del probe
        gc.collect()
    measurements = runs[0][1] if depths is None else extrapolate_depth(runs, arch.config.text_config.num_hidden_layers)
    report = {
        "config": config_name(config),
        "stage": stage,
        "architecture": {"source": arch.source, "via": arch.via},
        "changed": changed,
        "overrides": list(overrides),
        "measured": measurements,
        "estimate": estimate_gpu_memory(measurements, stage, training_args, model_args, launch_config(config)),
        "provenance": provenance(),
    }
    # The temporary folder is gone: the report names it by its role, not by this machine's path.
    text = json.dumps(report, default=str)
    for work in works:
        text = text.replace(str(work), "<temporary>")
    report = json.loads(text)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
