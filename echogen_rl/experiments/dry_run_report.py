"""A dry run's report (see [`echogen_rl.experiments.dry_run`]): the estimate of GPU memory per device at the
config's own batch, and the lines `echogen-rl dry-run` prints."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from echogen_rl.models.architectures import SHIPPED_CONFIGS

GIB = 1024**3


def launch_config(config: Path) -> tuple[str, dict] | None:
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
        sharded_terms = {t: v / n if t in shards else v for t, v in terms.items()}
        formula = [f"{t}/{n}" if t in shards else t for t in terms]
        if "weights" in shards and "root_unit" in p:
            # Sharded weights are gathered unit by unit: the root (text embeddings and head) for the whole step and
            # two decoder layers at a time (the one computing, the next prefetched), in the compute dtype.
            size = 2 if training_args.bf16 else p["weights_bytes"] / max(p["total"], 1)
            gathered = p["root_unit"] + 2 * p["decoder_layer"]
            formula.append("gathered (root + 2 layers)")
            if reference and kind == "FSDP":  # TRL shards the reference as one unit, gathered whole for its use
                gathered += p["total"]
                formula[-1] = "gathered (root + 2 layers + the whole reference)"
            sharded_terms["gathered"] = gathered * size
            estimate["gathered_bytes"] = int(sharded_terms["gathered"])
        estimate["sharded_formula"] = " + ".join(formula)
        estimate["sharded_bytes"] = int(sum(sharded_terms.values()))
    return estimate


def extrapolate_depth(runs: list[tuple[int, dict]], depth: int) -> dict:
    """The `measured` part of a model `depth` decoder layers deep, from runs at two smaller depths of the same width.

    The decoder layers are identical, so parameter counts and sizes are exactly linear in depth; so, with gradient
    checkpointing, is the memory the forward keeps (one input per layer) and the gradients. Each is extrapolated
    along the line through the two runs; step seconds too (a CPU's seconds, as in any dry run). A memory term the
    deeper run measured smaller (a CPU's RSS is noisy) is not extrapolated below the shallower run's: it stays at
    that, a lower bound, and `depth["flat"]` names it. The rest (device, tokens, what training changed) is the
    deeper run's.

    Args:
        runs (`list[tuple[int, dict]]`): `(layers, measured)` of two runs, e.g. at 1 and 2 layers.
        depth (`int`): the architecture's own number of decoder layers.
    """
    (k1, m1), (k2, m2) = sorted(runs, key=lambda run: run[0])
    if k1 == k2:
        raise ValueError(f"extrapolating in depth needs two different depths, got {k1} twice")

    flat = []  # measured memory that fell with depth: noise in a CPU's RSS, extrapolated flat rather than below 0

    def line(a: float, b: float, name: str | None = None) -> float:
        if name is not None and b < a:
            flat.append(name)
            return float(a)
        return a + (b - a) * (depth - k1) / (k2 - k1)

    counts = ("total", "trainable", "weights_bytes", "trainable_bytes")
    step_terms = ("seconds", "start_bytes", "forward_bytes", "gradients_bytes", "peak_bytes")
    first, second = m1["steps"][-1], m2["steps"][-1]
    steps = {k: line(first[k], second[k], k if k.endswith("_bytes") else None) for k in step_terms}
    peak = round(line(m1["process_peak_bytes"], m2["process_peak_bytes"], "process_peak_bytes"))
    return {
        **m2,
        "parameters": {
            **m2["parameters"],
            **{k: round(line(m1["parameters"][k], m2["parameters"][k])) for k in counts},
        },
        "steps": [{**second, **steps}],
        "process_peak_bytes": peak,
        "depth": {
            "layers": depth,
            "measured_layers": [k1, k2],
            "measured": {str(k1): m1, str(k2): m2},
            # A lower bound where listed: the deeper run measured less, so the line through the two is noise.
            "flat": flat,
        },
    }


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
        f"MEASURED ({len(m['steps'])} step(s), per-device batch {m['per_device_batch']}):"
        + (
            f" extrapolated to {m['depth']['layers']} decoder layers from runs at {m['depth']['measured_layers']}"
            if "depth" in m
            else ""
        ),
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
