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
estimate of the GPU memory per device at the config's own batch (see [`estimate_gpu_memory`]).
"""

from __future__ import annotations

import gc
import json
import math
import re
import resource
import shutil
import tempfile
import threading
import time
import typing
from pathlib import Path

import psutil
import torch
import yaml
from transformers import JanusForConditionalGeneration, Trainer, TrainerCallback
from trl import SFTConfig

from echogen_rl.data.synthetic import synthesize_missing
from echogen_rl.experiments.provenance import provenance
from echogen_rl.models.architectures import (
    SHIPPED_CONFIGS,
    config_name,
    resolve_architecture,
    write_random_checkpoint,
)
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.scripts.runner import as_cli as _as_cli
from echogen_rl.scripts.runner import load_recipe as _load_recipe
from echogen_rl.scripts.runner import parse_recipe_args as _parse
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.pmtp_config import PMTPConfig

STAGES = {"pmtp": PMTPConfig, "djo": DJOConfig, "cyclerl": CycleRLConfig}
GIB = 1024**3


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


class StepProbe(TrainerCallback):
    """Times each optimizer step and measures its tokens and memory (CUDA allocated memory on a GPU, else the
    process RSS sampled every 5 ms).

    Per step: `seconds`; `tokens`, the positions the language model runs in the step's graph-building forwards
    (padding excluded where the forward has a 2D attention mask); and, in bytes above the memory at the step's
    start, `forward` (the peak before the backward: activations, and rollouts for CycleRL), `gradients` (held
    after the backward) and `peak`.
    """

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.steps: list[dict] = []
        self.parameters: dict = {}
        self.changed: dict = {}
        self._process, self._peak, self._tokens, self._current = psutil.Process(), 0, 0, {}
        self.clock, self.setup_seconds = time.perf_counter(), 0.0
        self._sampling, self._thread, self._hook, self._lock = False, None, None, threading.Lock()

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else self._process.memory_info().rss

    def _peak_since_start(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else max(self._peak, self._now())

    def _sample(self) -> None:
        while self._sampling:
            with self._lock:  # a reset at a step's start must not be overwritten by the peak before it
                self._peak = max(self._peak, self._now())
            time.sleep(0.005)

    def _count_tokens(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return  # rollouts, grounding and reference log-probs build no graph
        mask, x = kwargs.get("attention_mask"), kwargs.get("inputs_embeds", kwargs.get("input_ids"))
        x = args[0] if x is None and args else x
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            self._tokens += int(mask.sum())
        elif x is not None:
            self._tokens += x.shape[0] * x.shape[1]

    def attach(self, trainer: Trainer) -> None:
        """Hooks the language model (token counts) and the accelerator's backward (memory before it)."""
        self.trainer = trainer
        language_model = unwrap_janus(trainer.model).model.language_model
        self._hook = language_model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        backward = trainer.accelerator.backward

        def measured_backward(loss, **kwargs):
            self._current["forward"] = self._peak_since_start() - self._current["start"]
            return backward(loss, **kwargs)

        trainer.accelerator.backward = measured_backward

    def on_train_begin(self, args, state, control, **kwargs):
        self.setup_seconds = time.perf_counter() - self.clock
        params = list(self.trainer.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        self.parameters = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable),
            "weights_bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
        }
        self._before = [(p, p.detach().reshape(-1)[:64].clone()) for p in trainable]
        if not self.cuda:
            self._sampling, self._thread = True, threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        with self._lock:
            self._peak, self._tokens = self._now(), 0
        self._current = {"start": self._peak, "clock": time.perf_counter()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._current["gradients"] = self._now() - self._current["start"]

    def on_step_end(self, args, state, control, **kwargs):
        c = self._current
        self.steps.append(
            {
                "seconds": time.perf_counter() - c["clock"],
                "tokens": self._tokens,
                "start_bytes": c["start"],
                "forward_bytes": c.get("forward", 0),
                "gradients_bytes": c.get("gradients", 0),
                "peak_bytes": self._peak_since_start() - c["start"],
            }
        )

    def on_train_end(self, args, state, control, **kwargs):
        self._sampling = False
        if self._thread is not None:
            self._thread.join()
        self._hook.remove()
        moved = sum(not torch.equal(p.detach().reshape(-1)[:64], before) for p, before in self._before)
        self.changed = {"tensors_sampled": len(self._before), "tensors_changed": int(moved)}


def _probed(trainer_cls: type, probe: StepProbe) -> type:
    class DryRunTrainer(trainer_cls):
        """The recipe's trainer with the probe; the recipe's closing `save_model` writes nothing (GBs at 7B)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(probe)
            probe.attach(self)

        def save_model(self, output_dir=None, _internal_call=False):
            pass

    DryRunTrainer.__name__ = DryRunTrainer.__qualname__ = trainer_cls.__name__
    return DryRunTrainer


def _launch_config(config: Path) -> tuple[str, dict] | None:
    """The accelerate config that the YAML's launch command (in its comments) names, and its contents."""
    match = re.search(r"--config_file\s+(\S+\.yaml)", config.read_text())
    if match is None:
        return None
    # As the user runs it (from their folder), else the shipped file it names (package data).
    name = match.group(1)
    shipped = SHIPPED_CONFIGS.parent / "accelerate_configs" / Path(name).name
    for path in (Path.cwd() / name, shipped if name.startswith("recipes/accelerate_configs/") else None):
        if path is not None and path.is_file():
            return name, yaml.safe_load(path.read_text())
    return None


def estimate_gpu_memory(measured: dict, stage: str, training_args, model_args, launch) -> dict:
    """GPU memory per device at the config's per-device batch, in bytes.

    Weights (and a reference copy for CycleRL with `beta > 0` and no LoRA) in their loaded dtypes, gradients and
    AdamW's two states in the trainable parameters' dtypes (8-bit optimizers: one byte each), plus the measured
    forward memory scaled by real batch / dry batch. Gradient accumulation adds nothing. The single-device figure
    is the sum; a ZeRO/FSDP launch config divides the terms it shards by its process count.
    """
    p, last = measured["parameters"], measured["steps"][-1]
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    reference = stage == "cyclerl" and training_args.beta > 0 and not model_args.use_peft
    scale = training_args.per_device_train_batch_size / measured["per_device_batch"]
    terms = {
        "weights": p["weights_bytes"] * (2 if reference else 1),
        "gradients": p["trainable_bytes"],
        "optimizer": 2 * (p["trainable"] if "8bit" in optim else p["trainable_bytes"]),
        "activations": last["forward_bytes"] * scale,
    }
    estimate = {
        "per_device_batch": training_args.per_device_train_batch_size,
        "activation_scale": scale,
        "optimizer": optim,
        "reference_model": reference,
        **{f"{k}_bytes": int(v) for k, v in terms.items()},
        "single_device_bytes": int(sum(terms.values())),
        "formula": "weights + gradients + optimizer + activations",
    }
    if launch is not None:
        name, cfg = launch
        kind, n = cfg.get("distributed_type"), int(cfg.get("num_processes", 1))
        zero = (cfg.get("deepspeed_config") or {}).get("zero_stage", 0) if kind == "DEEPSPEED" else None
        sharded = {1: ["optimizer"], 2: ["gradients", "optimizer"], 3: ["weights", "gradients", "optimizer"]}
        shards = sharded.get(zero, []) if kind == "DEEPSPEED" else sharded[3] if kind == "FSDP" else []
        how = f"DeepSpeed ZeRO-{zero}" if kind == "DEEPSPEED" else kind
        estimate["launch"] = {"config": name, "kind": how, "num_processes": n, "sharded": shards}
        estimate["sharded_formula"] = " + ".join(f"{t}/{n}" if t in shards else t for t in terms)
        estimate["sharded_bytes"] = int(sum(v / n if t in shards else v for t, v in terms.items()))
    return estimate


def run_dry_run(
    config: str | Path,
    steps: int = 1,
    batch_size: int = 1,
    stage: str | None = None,
    architecture: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    json_path: str | Path | None = None,
    work_dir: str | Path | None = None,
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
    script_args, training_args, model_args = _parse(classes, config, [*cpu, *overrides])
    # The start checkpoint may be the output of a config beside this one, or of a shipped one.
    config_dirs = [config.resolve().parent.parent] if config.parent.name in STAGES else []
    config_dirs = list(dict.fromkeys([*config_dirs, SHIPPED_CONFIGS]))
    arch = resolve_architecture(
        model_args.model_name_or_path, model_args.build_tiny_if_missing, config_dirs, architecture
    )
    cpu_changes = cpu_adjustments(arch, stage, training_args, model_args)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="echogen-dry-run-", dir=work_dir))
    try:
        print(f"dry run: random-init checkpoint of {arch.source} in {work}", flush=True)
        clock = time.perf_counter()
        changed = {"model_name_or_path": str(write_random_checkpoint(arch, work / "checkpoint"))}
        phases = {"checkpoint_seconds": time.perf_counter() - clock}
        gc.collect()
        changed.update(dry_run_overrides(stage, values, training_args, steps, batch_size, work))
        changed.update(cpu_changes)
        if stage != "cyclerl" or training_args.prompt_source == "dataset":
            changed.update(synthesize_missing(script_args, work / "data", changed["num_train_samples"]))
        probe = StepProbe()
        name = next(k for k, v in vars(recipe).items() if isinstance(v, type) and issubclass(v, Trainer))
        trainer_cls = getattr(recipe, name)
        setattr(recipe, name, _probed(trainer_cls, probe))  # the script module is shared: put it back after
        probe.clock = time.perf_counter()
        try:
            recipe.main(*_parse(classes, config, [*_as_cli(changed), *overrides]))
        finally:
            setattr(recipe, name, trainer_cls)
        phases["setup_seconds"] = probe.setup_seconds  # loading, data (VQ encoding), trainer
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = {
        "device": torch.cuda.get_device_name() if probe.cuda else "cpu",
        **phases,
        "per_device_batch": changed["per_device_train_batch_size"],
        "steps": probe.steps,
        "parameters": probe.parameters,
        "trainable_values": probe.changed,
        "process_peak_bytes": max(s["start_bytes"] + s["peak_bytes"] for s in probe.steps)
        if probe.cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "last_log": next((h for h in reversed(probe.trainer.state.log_history) if "loss" in h), {}),
    }
    report = {
        "config": config_name(config),
        "stage": stage,
        "architecture": {"source": arch.source, "via": arch.via},
        "changed": changed,
        "overrides": list(overrides),
        "measured": measured,
        "estimate": estimate_gpu_memory(measured, stage, training_args, model_args, _launch_config(config)),
        "provenance": provenance(),
    }
    # The temporary folder is gone: the report names it by its role, not by this machine's path.
    report = json.loads(json.dumps(report, default=str).replace(str(work), "<temporary>"))
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def format_report(report: dict) -> str:
    """The report as the lines `echogen-rl dry-run` prints."""
    m, e, p = report["measured"], report["estimate"], report["measured"]["parameters"]
    gib = lambda b: f"{b / GIB:.2f} GiB" if abs(b) >= GIB / 10 else f"{b / 2**20:.1f} MiB"  # noqa: E731
    seconds = ", ".join(f"{s['seconds']:.1f}" for s in m["steps"])
    changed = {k: "(temporary)" if "<temporary>" in str(v) else v for k, v in report["changed"].items()}
    lines = [
        f"dry run of {report['config']} (stage {report['stage']}) on {m['device']}",
        f"  architecture: {report['architecture']['source']}, random init"
        + "".join(f"\n    via {v}" for v in report["architecture"]["via"]),
        "  changed from the config: " + ", ".join(f"{k}={v}" for k, v in changed.items()),
        f"  your overrides: {' '.join(report['overrides']) or 'none'}",
        f"MEASURED ({len(m['steps'])} step(s), per-device batch {m['per_device_batch']}):",
        f"  time                 checkpoint {m['checkpoint_seconds']:.0f} s, model and data {m['setup_seconds']:.0f} s, "
        f"steps {seconds} s",
        f"  tokens per step      {', '.join(str(s['tokens']) for s in m['steps'])}",
        f"  parameters           {p['total']:,} total, {p['trainable']:,} trainable ({', '.join(p['dtypes'])})",
        f"  peak memory          {gib(m['process_peak_bytes'])} ({'process RSS' if m['device'] == 'cpu' else 'CUDA allocated'})",
        f"  during the last step {gib(m['steps'][-1]['start_bytes'])} at its start; above that: forward "
        f"{gib(m['steps'][-1]['forward_bytes'])}, gradients {gib(m['steps'][-1]['gradients_bytes'])}, "
        f"peak {gib(m['steps'][-1]['peak_bytes'])}",
        f"  trainable tensors changed by training: {m['trainable_values'].get('tensors_changed')} of "
        f"{m['trainable_values'].get('tensors_sampled')} sampled",
        "  last log             "
        + ", ".join(f"{k}={v:.4g}" for k, v in m["last_log"].items() if isinstance(v, float)),
        f"ESTIMATED GPU memory per device at the config's per-device batch {e['per_device_batch']}:",
        f"  weights              {gib(e['weights_bytes'])}"
        + (" (with the reference model)" if e["reference_model"] else ""),
        f"  gradients            {gib(e['gradients_bytes'])}",
        f"  optimizer states     {gib(e['optimizer_bytes'])} ({e['optimizer']}, 2 per trainable parameter)",
        f"  activations          {gib(e['activations_bytes'])} (measured forward x {e['activation_scale']:g})",
        f"  one device           {gib(e['single_device_bytes'])} = {e['formula']}",
        "  (the word-level tokenizer spells a coordinate as one token, Janus-Pro's as up to three digits: text is",
        "  shorter than in the real run; a CPU step time says nothing about a GPU's)",
    ]
    if "launch" in e:
        launch = e["launch"]
        lines.append(
            f"  {launch['config']}: {launch['kind']} over {launch['num_processes']} processes, "
            f"{gib(e['sharded_bytes'])} = {e['sharded_formula']}"
        )
    return "\n".join(lines)
