"""Shipped YAML configs parse into their recipe's dataclasses; the offline recipes run end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from transformers import JanusForConditionalGeneration
from trl import TrlParser

from echogen_rl.data.sources import CycleRLDataArguments, LayoutDataArguments
from echogen_rl.models.loading import JanusModelConfig
from echogen_rl.scripts.pmtp import make_parser
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.pmtp_config import PMTPConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DATACLASSES = {
    "pmtp": (LayoutDataArguments, PMTPConfig, JanusModelConfig),
    "djo": (LayoutDataArguments, DJOConfig, JanusModelConfig),
    "cyclerl": (CycleRLDataArguments, CycleRLConfig, JanusModelConfig),
}


def _configs():
    return [
        (stage, p) for stage in RECIPE_DATACLASSES for p in sorted((ROOT / "recipes/configs" / stage).glob("*.yaml"))
    ]


@pytest.mark.parametrize("stage,path", _configs(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_every_shipped_yaml_parses(stage, path, tmp_path):
    classes = RECIPE_DATACLASSES[stage]
    values = yaml.safe_load(path.read_text())
    known = {f for cls in classes for f in cls.__dataclass_fields__}
    assert not set(values) - known, f"unknown keys in {path.name}: {set(values) - known}"
    # GPU configs ask for bf16, which TrainingArguments refuses on a CPU-only machine; all else is checked.
    values.update(bf16=False, use_cpu=True, output_dir=str(tmp_path))
    parsed = TrlParser(classes).parse_dict(values, allow_extra_keys=False)
    assert [type(p) for p in parsed] == list(classes)


PREVIOUS_STAGE = {"djo": "pmtp", "cyclerl": "djo"}


@pytest.mark.parametrize("stage,path", _configs(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_shipped_configs_chain(stage, path):
    """Each stage starts where a shipped config of the stage before ends (or, for PMTP, from a hub id or the tiny
    checkpoint), so that the printed commands run one after the other."""
    start = yaml.safe_load(path.read_text())["model_name_or_path"]
    if stage == "pmtp" and (start.startswith("deepseek-community/") or start == "outputs/tiny-janus"):
        return
    # PMTP's second phase (shapes_tiny_kinds.yaml) starts where its first ends.
    previous = sorted((ROOT / "recipes/configs" / PREVIOUS_STAGE.get(stage, stage)).glob("*.yaml"))
    previous = [p for p in previous if p != path]
    outputs = {yaml.safe_load(p.read_text())["output_dir"] for p in previous}
    assert start in outputs, (
        f"{path.name} starts from {start}, which no {PREVIOUS_STAGE.get(stage, stage)} config writes"
    )
    # The same size and family: a GPU stage starts from a GPU stage.
    assert path.name.startswith("shapes") == ("shapes-tiny" in start)


def test_the_kinds_phase_runs_two_cosine_cycles_each_from_its_peak(tmp_path):
    """PMTP's second phase, as chosen on the validation split: 3000 steps of cosine from 5e-4, then the same again
    (one run, `cosine_with_restarts`); the learning rate the trainer would follow restarts at the midpoint."""
    import torch
    from transformers import get_scheduler

    path = ROOT / "recipes/configs/pmtp/shapes_tiny_kinds.yaml"
    _, args, _ = make_parser().parse_args_and_config(["--config", str(path), "--output_dir", str(tmp_path)])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    schedule = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps,
        num_training_steps=args.max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(args.max_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    half = args.max_steps // 2
    assert (args.max_steps, args.learning_rate, half) == (6000, 5e-4, 3000)
    assert rates[0] == rates[half] == pytest.approx(5e-4)
    assert rates[half - 1] < 1e-9 and rates[-1] < 1e-9
    assert rates[:half] == pytest.approx(rates[half:], abs=1e-12)


@pytest.mark.parametrize("path", sorted(ROOT.glob("recipes/configs/*/janus_pro_*.yaml")), ids=lambda p: p.name)
def test_gpu_configs_keep_fp32_master_weights(path):
    """Loading bf16 weights and training with `bf16: true` would leave no fp32 copy to apply small updates to."""
    values = yaml.safe_load(path.read_text())
    assert values["dtype"] == "float32" and values["bf16"] is True


def test_unknown_yaml_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: shapes\nlerning_rate: 0.1\n")
    parser = make_parser()  # the recipe's own parser
    with pytest.raises(ValueError, match="lerning_rate"):
        parser.parse_args_and_config(
            ["--config", str(bad), "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false"]
        )


def _launch(recipe, config, tmp_path, *overrides):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", str(ROOT / "recipes" / recipe)]
    cmd += ["--config", str(ROOT / "recipes/configs" / config), *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _log_history(output_dir: Path) -> list[dict]:
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"))
    return json.loads(states[-1].read_text())["log_history"]


def test_pmtp_recipe_runs_offline_and_both_losses_fall(tmp_path):
    out = tmp_path / "pmtp"
    _launch(
        "pmtp.py",
        "pmtp/shapes_tiny.yaml",
        tmp_path,
        "--model_name_or_path", str(tmp_path / "tiny-janus"),
        "--output_dir", str(out),
        "--max_steps", "40",
        "--num_train_samples", "640",
        "--logging_steps", "5",
        "--eval_steps", "40",
        "--save_steps", "40",
        "--dataloader_num_workers", "0",
    )  # fmt: skip
    logs = [h for h in _log_history(out) if "loss_img" in h]
    assert logs[-1]["loss_img"] < 0.8 * logs[0]["loss_img"]
    assert logs[-1]["loss_text"] < 0.5 * logs[0]["loss_text"]
    model = JanusForConditionalGeneration.from_pretrained(out)  # plain transformers loads the result
    assert model.config.vision_config.num_image_tokens == 64
    assert (out / "tokenizer.json").exists()


def test_djo_recipe_continues_a_pmtp_checkpoint_and_the_loop_loss_falls(tmp_path):
    start = tmp_path / "pmtp"
    _launch(
        "pmtp.py",
        "pmtp/shapes_tiny.yaml",
        tmp_path,
        "--model_name_or_path", str(tmp_path / "tiny-janus"),
        "--output_dir", str(start),
        "--max_steps", "5",
        "--num_train_samples", "80",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--dataloader_num_workers", "0",
    )  # fmt: skip
    out = tmp_path / "djo"
    _launch(
        "djo.py",
        "djo/shapes_tiny.yaml",
        tmp_path,
        "--model_name_or_path", str(start),
        "--output_dir", str(out),
        "--max_steps", "30",
        "--num_train_samples", "320",
        # The shipped 5e-5 restarts a trained PMTP model gently; from 5 PMTP steps, 30 steps at it move little.
        "--learning_rate", "1e-3",
        "--warmup_steps", "5",
        "--logging_steps", "5",
        "--eval_strategy", "no",
        "--save_steps", "30",
        "--dataloader_num_workers", "0",
    )  # fmt: skip
    logs = [h for h in _log_history(out) if "loss_loop" in h]
    assert logs[-1]["loss_loop"] < 0.8 * logs[0]["loss_loop"]
    assert logs[-1]["tau"] < logs[0]["tau"] <= 1.0
    model = JanusForConditionalGeneration.from_pretrained(out)  # plain transformers loads the result
    assert model.config.vision_config.num_image_tokens == 64


def test_cyclerl_recipe_runs_offline_with_lora_and_saves_an_adapter(tmp_path):
    start = tmp_path / "pmtp"
    _launch(
        "pmtp.py", "pmtp/shapes_tiny.yaml", tmp_path,
        "--model_name_or_path", str(tmp_path / "tiny-janus"), "--output_dir", str(start),
        "--max_steps", "3", "--num_train_samples", "48", "--eval_strategy", "no", "--save_strategy", "no",
    )  # fmt: skip
    out = tmp_path / "cyclerl"
    _launch(
        "cyclerl.py", "cyclerl/shapes_tiny.yaml", tmp_path,
        "--model_name_or_path", str(start), "--output_dir", str(out),
        "--max_steps", "3", "--num_random_prompts", "16", "--per_device_train_batch_size", "8",
        "--num_generations", "4", "--logging_steps", "1", "--save_steps", "3",
        # A 3-step PMTP grounds nothing, so cycle rewards are all 0 and give no advantage: box_fill varies between
        # images, so the adapter has something to learn from.
        "--reward_funcs", "cycle_iou", "grounding_format", f"{ROOT / 'rewards/custom_reward.py'}:box_fill",
        "--reward_weights", "1.0", "0.1", "0.5",
    )  # fmt: skip
    logs = [h for h in _log_history(out) if "rewards/cycle_iou/mean" in h]
    assert len(logs) == 3
    for key in ("rewards/cycle_iou/mean", "rewards/grounding_format/mean", "cycle_miou", "rollout/images_per_second"):
        assert all(math.isfinite(h[key]) for h in logs), key
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    # The adapter moved: PEFT starts every lora_B at zero, and a saved adapter of zeros would be a no-op.
    saved = load_file(out / "adapter_model.safetensors")
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert lora_b and any(v.abs().max() > 0 for v in lora_b.values())


def test_cyclerl_recipe_says_how_to_make_its_missing_start(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(ROOT / "recipes/cyclerl.py"),
        "--config",
        str(ROOT / "recipes/configs/cyclerl/shapes_tiny.yaml"),
    ]
    cmd += ["--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "accelerate launch recipes/djo.py --config recipes/configs/djo/shapes_tiny.yaml" in proc.stderr
