"""`echogen-rl dry-run`: stage and architecture resolution, the stand-in checkpoint and data, the run and its report."""

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import yaml
from PIL import Image
from transformers import JanusConfig, JanusForConditionalGeneration, Trainer, TrainerCallback

from echogen_rl.cli import main as cli_main
from echogen_rl.data.sources import LayoutDataArguments, build_layout_datasets, load_coco, load_layoutsam
from echogen_rl.data.synthetic import synthesize_missing, write_coco, write_layoutsam
from echogen_rl.experiments.dry_run import cpu_adjustments, infer_stage, run_dry_run
from echogen_rl.experiments.dry_run_report import estimate_gpu_memory, extrapolate_depth, format_report
from echogen_rl.layout import LAYOUT_TAGS, Layout
from echogen_rl.models.architectures import (
    Architecture,
    build_random_checkpoint,
    load_architecture,
    resolve_architecture,
    write_random_checkpoint,
)
from echogen_rl.models.image_tokenizers import PaletteTokenizer
from echogen_rl.models.loading import load_janus
from echogen_rl.models.tiny import SPECIAL_TOKENS, build_tiny_tokenizer, tiny_vocabulary

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
GPU_CONFIGS = sorted(CONFIGS.glob("*/janus_pro_*.yaml"))


def _small_architecture(path: Path) -> Path:
    """Janus-Pro-1B's config at toy size (vocabulary 2048, 8 x 8 image codes): the real layout, seconds to run."""
    arch = json.loads((ROOT / "echogen_rl/models/architectures/janus_pro_1b.json").read_text())
    arch["text_config"].update(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16
    )
    arch["text_config"].update(num_attention_heads=4, num_key_value_heads=4, bos_token_id=None)
    arch["text_config"].update(eos_token_id=None, pad_token_id=None)
    arch["vision_config"].update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=64)
    arch["vision_config"].update(image_size=32, patch_size=4, num_image_tokens=64)
    arch["vq_config"].update(num_embeddings=512, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 1])
    arch["vq_config"].update(num_res_blocks=1, num_patches=8, projection_dim=64, image_token_embed_dim=64)
    arch["image_token_id"] = 0
    path.write_text(json.dumps(arch))
    return path


def _write_yaml(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


# -- stage and architecture ------------------------------------------------------------------------------------------


def test_stage_comes_from_the_folder_then_the_fields_and_an_explicit_stage_wins(tmp_path):
    assert infer_stage(CONFIGS / "djo/shapes_tiny.yaml", {}) == "djo"
    assert infer_stage(tmp_path / "mine.yaml", {"loop_weight": 0.5, "learning_rate": 1e-4}) == "djo"
    assert infer_stage(tmp_path / "mine.yaml", {"reward_funcs": ["cycle_iou"]}) == "cyclerl"
    assert infer_stage(tmp_path / "mine.yaml", {"num_generations": 4}) == "cyclerl"
    assert infer_stage(tmp_path / "mine.yaml", {"uncond_prob": 0.1}) == "pmtp"
    assert infer_stage(CONFIGS / "djo/shapes_tiny.yaml", {}, stage="pmtp") == "pmtp"
    with pytest.raises(ValueError, match="no stage-specific field"):
        infer_stage(tmp_path / "mine.yaml", {"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="fields of pmtp and djo"):
        infer_stage(tmp_path / "mine.yaml", {"uncond_prob": 0.1, "loop_weight": 1.0})
    with pytest.raises(ValueError, match="stage must be one of"):
        infer_stage(tmp_path / "mine.yaml", {}, stage="sft")


def test_shipped_architectures_have_the_published_sizes():
    small, large = load_architecture("deepseek-community/Janus-Pro-1B"), load_architecture("janus_pro_7b")
    for config, (hidden, layers, heads, mlp) in ((small, (2048, 24, 16, 5632)), (large, (4096, 30, 32, 11008))):
        text = config.text_config
        assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (hidden, layers, heads)
        assert (text.intermediate_size, text.vocab_size, text.max_position_embeddings) == (mlp, 102400, 16384)
        assert config.vision_config.image_size == 384 and config.vision_config.num_image_tokens == 576
        assert config.vq_config.num_embeddings == 16384 and config.vq_config.num_patches == 24
        assert config.vq_config.image_token_embed_dim == config.vision_config.projection_dim == hidden
    with torch.device("meta"):  # sizes only, no memory
        counts = [sum(p.numel() for p in JanusForConditionalGeneration(c).parameters()) for c in (small, large)]
    assert 2.0e9 < counts[0] < 2.2e9 and 7.3e9 < counts[1] < 7.5e9
    with pytest.raises(ValueError, match="unknown architecture"):
        load_architecture("janus_pro_70b")


def test_architecture_follows_the_chain_of_configs_back_to_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the chain's relative outputs/... must not exist
    arch = resolve_architecture("outputs/pmtp-janus-pro-1b-coco")
    assert arch.config.text_config.hidden_size == 2048 and arch.via == ["recipes/configs/pmtp/janus_pro_1b_coco.yaml"]
    arch = resolve_architecture("outputs/djo-shapes-tiny")  # DJO <- PMTP's two phases <- the tiny checkpoint
    assert arch.config is None
    assert [Path(v).parent.name for v in arch.via] == ["djo", "pmtp", "pmtp"]

    configs = tmp_path / "configs"
    _write_yaml(
        configs / "pmtp/a.yaml", {"model_name_or_path": "deepseek-community/Janus-Pro-7B", "output_dir": "o/a"}
    )
    _write_yaml(configs / "djo/b.yaml", {"model_name_or_path": "o/a", "output_dir": "o/b"})
    arch = resolve_architecture("o/b", config_dirs=[configs])
    assert arch.config.text_config.num_hidden_layers == 30
    assert arch.via == [str(configs / "djo/b.yaml"), str(configs / "pmtp/a.yaml")]

    _write_yaml(configs / "djo/loop.yaml", {"model_name_or_path": "o/loop", "output_dir": "o/loop"})
    for missing in ("o/nowhere", "o/loop"):
        with pytest.raises(ValueError, match="--architecture janus_pro_1b"):
            resolve_architecture(missing, config_dirs=[configs])


def test_architecture_of_a_local_checkpoint_or_an_explicit_choice(tiny_checkpoint, tmp_path):
    arch = resolve_architecture(str(tiny_checkpoint))
    assert "local checkpoint" in arch.source and arch.config.vision_config.num_image_tokens == 64
    assert resolve_architecture("anything", architecture="tiny").config is None
    assert resolve_architecture("anything", architecture="janus_pro_7b").config.text_config.hidden_size == 4096
    small = _small_architecture(tmp_path / "small.json")
    assert resolve_architecture("anything", architecture=str(small)).config.text_config.vocab_size == 2048


# -- the stand-in checkpoint and data --------------------------------------------------------------------------------


def test_padded_tokenizer_keeps_the_tiny_layout_and_stays_in_the_vocabulary():
    tiny, padded = build_tiny_tokenizer(), build_tiny_tokenizer(vocab_size=102400)
    assert len(padded) == 102400
    for token in (*SPECIAL_TOKENS, *LAYOUT_TAGS):
        assert padded.convert_tokens_to_ids(token) == tiny.convert_tokens_to_ids(token) < len(tiny_vocabulary())
    text = (
        "a red circle "
        + Layout.from_json(
            '{"caption": "x", "entities": [{"phrase": "red circle", "box": [0.1, 0.2, 0.5, 0.9]}]}'
        ).to_text()
    )
    ids = padded(text).input_ids
    assert ids == tiny(text).input_ids and max(ids) < 102400 and padded.unk_token_id not in ids
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        build_tiny_tokenizer(vocab_size=10)


def test_random_checkpoint_loads_like_a_real_one_with_sane_weights(tmp_path):
    arch = Architecture(JanusConfig.from_json_file(_small_architecture(tmp_path / "small.json")), "small")
    path = write_random_checkpoint(arch, tmp_path / "ckpt")  # stored in the architecture's dtype, bfloat16
    model, tokenizer = load_janus(str(path), "float32")
    assert len(tokenizer) == 2048 == model.config.text_config.vocab_size  # the layout tags were already there
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image_placeholder>")
    assert model.config.text_config.pad_token_id == tokenizer.pad_token_id
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    q_proj = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert 0.015 < q_proj.std().item() < 0.025
    assert torch.equal(model.model.language_model.norm.weight, torch.ones(64))
    assert not torch.equal(q_proj, model.model.language_model.layers[1].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="more than vocab_size"):
        build_random_checkpoint(arch.config, build_tiny_tokenizer(4096), tmp_path / "too-big")


def test_synthetic_coco_and_layoutsam_load_through_the_real_loaders(tmp_path):
    coco = write_coco(tmp_path / "coco", 3, num_entities=4, seed=1)
    rows, stats = load_coco(**coco, cache_dir=tmp_path / "cache")
    assert len(rows) == 3 and stats.bad_layouts == 0 and stats.tiny_boxes_dropped == 0
    assert all(len(Layout.from_json(r).entities) == 4 for r in rows["layout"])
    assert Image.open(rows["image_path"][0]).size == (640, 480)

    sam = write_layoutsam(tmp_path / "sam", 3, num_entities=10)
    first = json.loads(sam["file"].read_text().splitlines()[0])
    assert isinstance(first["bbox_list"], str) and isinstance(first["detail_region_caption_list"], str)
    rows, stats = load_layoutsam(sam["file"], sam["image_dir"], cache_dir=tmp_path / "cache")
    assert len(rows) == 3 and stats.bad_layouts == stats.bad_images == 0
    assert Layout.from_json(rows["layout"][0]).entities[0].phrase.startswith("a ")  # the detail captions

    args = LayoutDataArguments(
        dataset="coco",
        coco_instances_file=str(coco["instances_file"]),
        coco_captions_file=str(coco["captions_file"]),
        coco_image_dir=str(coco["image_dir"]),
        num_eval_samples=0,
        cache_dir=str(tmp_path / "cache"),
    )
    train, _, _ = build_layout_datasets(args, PaletteTokenizer())  # and on through the image encoding
    assert len(train) == 3 and all(len(codes) == 64 for codes in train["image_codes"])

    assert synthesize_missing(args, tmp_path / "unused", 2) == {}  # existing paths are used as they are
    args.layoutsam_file, args.dataset = "data/nowhere.jsonl", "layoutsam"
    written = synthesize_missing(args, tmp_path / "made", 2)
    assert set(written) == {"layoutsam_file", "layoutsam_image_dir"} and Path(written["layoutsam_file"]).is_file()


# -- the run and its report ------------------------------------------------------------------------------------------


def test_the_hooks_the_dry_run_relies_on_exist():
    assert list(inspect.signature(Trainer.save_model).parameters) == ["self", "output_dir", "_internal_call"]
    for event in ("on_train_begin", "on_step_begin", "on_pre_optimizer_step", "on_step_end", "on_train_end"):
        assert callable(getattr(TrainerCallback, event))
    from accelerate import Accelerator

    assert "loss" in inspect.signature(Accelerator.backward).parameters


def _check_report(report: dict, steps: int) -> None:
    measured, estimate = report["measured"], report["estimate"]
    assert len(measured["steps"]) == steps
    assert all(s["seconds"] > 0 and s["tokens"] > 0 for s in measured["steps"])
    params = measured["parameters"]
    assert params["total"] >= params["trainable"] > 0 and params["weights_bytes"] > 0
    assert measured["process_peak_bytes"] > params["weights_bytes"]
    assert math.isfinite(measured["last_log"]["loss"])
    parts = sum(estimate[f"{k}_bytes"] for k in ("weights", "gradients", "optimizer", "activations"))
    assert estimate["single_device_bytes"] == pytest.approx(parts, abs=4)
    assert estimate["optimizer_bytes"] == 2 * estimate["gradients_bytes"] == 2 * params["trainable_bytes"]


@pytest.mark.parametrize("stage", ["pmtp", "djo", "cyclerl"])
def test_dry_run_of_the_tiny_shapes_configs(stage, tmp_path, capsys):
    """DJO and CycleRL start from a PMTP / DJO output that does not exist: the dry run follows the configs back to
    the tiny checkpoint and runs on random init, with the recipe's own settings except those it lists."""
    config = CONFIGS / stage / "shapes_tiny.yaml"
    report_file = tmp_path / "report.json"
    argv = ["dry-run", "--config", str(config), "--steps", "2", "--json", str(report_file)]
    assert cli_main([*argv, "--work-dir", str(tmp_path), "--", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "MEASURED" in printed and "ESTIMATED GPU memory per device" in printed
    report = json.loads(report_file.read_text())
    _check_report(report, steps=2)
    assert (
        report["stage"] == stage
        and report["architecture"]["via"]
        == {
            "pmtp": [],
            "djo": ["recipes/configs/pmtp/shapes_tiny_kinds.yaml", "recipes/configs/pmtp/shapes_tiny.yaml"],
            "cyclerl": [
                "recipes/configs/djo/shapes_tiny.yaml",
                "recipes/configs/pmtp/shapes_tiny_kinds.yaml",
                "recipes/configs/pmtp/shapes_tiny.yaml",
            ],
        }[stage]
    )
    assert report["changed"]["max_steps"] == 2 and report["overrides"] == ["--seed", "3"]
    assert report["estimate"]["per_device_batch"] == yaml.safe_load(config.read_text())["per_device_train_batch_size"]
    changed = report["measured"]["trainable_values"]
    if stage == "cyclerl":  # a random grounder earns no reward: every advantage is 0 and nothing moves
        assert report["measured"]["per_device_batch"] == 2 and report["changed"]["num_generations"] == 2
    else:
        assert changed["tensors_changed"] == changed["tensors_sampled"] > 0
    assert not list(tmp_path.glob("echogen-dry-run-*"))  # the checkpoint, data and output are removed
    # The result names what ran, and no path of this machine: the config by its repository path, the temporary
    # folder by its role.
    text = report_file.read_text()
    assert (
        str(tmp_path) not in text
        and str(ROOT) not in text
        and report["config"] == f"recipes/configs/{stage}/shapes_tiny.yaml"
    )
    assert report["changed"]["output_dir"] == "<temporary>/output"
    assert (
        set(report["provenance"]) == {"commit", "versions", "hardware"} and report["provenance"]["hardware"]["cores"]
    )


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_dry_run_of_the_gpu_configs_on_a_small_architecture(config, tmp_path, monkeypatch):
    """Every GPU config's own settings (bf16, gradient checkpointing, LoRA, its data format, synthesized here) on
    Janus-Pro's layout at toy size."""
    monkeypatch.chdir(tmp_path)  # data/... and outputs/... do not exist here
    small = _small_architecture(tmp_path / "small.json")
    report = run_dry_run(config, steps=2, architecture=str(small), work_dir=tmp_path)
    _check_report(report, steps=2)
    values = yaml.safe_load(config.read_text())
    data_keys = {"coco": "coco_instances_file", "layoutsam": "layoutsam_file"}
    assert data_keys[values["dataset"]] in report["changed"]  # the config's paths are absent: synthetic rows
    launch = report["estimate"]["launch"]
    assert (
        launch["num_processes"] == 8
        and report["estimate"]["sharded_bytes"] <= report["estimate"]["single_device_bytes"]
    )


def test_a_dry_run_at_two_depths_extrapolates_to_the_full_depth(tmp_path, monkeypatch):
    """`layers`: runs at 1 and 2 decoder layers give, on the line through them, the parameter counts and sizes of the
    full-depth run exactly (the layers are identical); FSDP's estimate adds the units it gathers."""
    monkeypatch.chdir(tmp_path)
    arch = json.loads(_small_architecture(tmp_path / "small.json").read_text())
    arch["text_config"]["num_hidden_layers"] = 4
    small = tmp_path / "small4.json"
    small.write_text(json.dumps(arch))
    config = CONFIGS / "pmtp" / "janus_pro_7b_coco.yaml"  # FSDP over 8 processes
    full = run_dry_run(config, steps=1, architecture=str(small), work_dir=tmp_path)
    shallow = run_dry_run(config, steps=1, architecture=str(small), work_dir=tmp_path, layers=(2, 1))
    depth = shallow["measured"]["depth"]
    assert depth["layers"] == 4 and depth["measured_layers"] == [1, 2]
    one, two = (depth["measured"][k]["parameters"] for k in ("1", "2"))
    assert one["total"] < two["total"] < full["measured"]["parameters"]["total"]
    for key in ("total", "trainable", "weights_bytes", "trainable_bytes", "root_unit", "decoder_layer"):
        assert shallow["measured"]["parameters"][key] == full["measured"]["parameters"][key], key
    for report in (full, shallow):
        estimate, params = report["estimate"], report["measured"]["parameters"]
        assert estimate["launch"]["kind"] == "FSDP" and estimate["gathered_bytes"] == 2 * (
            params["root_unit"] + 2 * params["decoder_layer"]
        )  # bf16: 2 bytes per gathered weight
        assert estimate["sharded_formula"].endswith("gathered (root + 2 layers)")
    assert shallow["estimate"]["weights_bytes"] == full["estimate"]["weights_bytes"]
    assert "extrapolated to 4 decoder layers from runs at [1, 2]" in format_report(shallow)
    assert not list(tmp_path.glob("echogen-dry-run-*"))  # both temporary folders removed


@pytest.mark.parametrize("layers", [(1, 1), (0, 2), (1, 4), (1, 2, 3)])
def test_depths_to_extrapolate_from_must_be_two_below_the_models(layers, tmp_path):
    small = _small_architecture(tmp_path / "small.json")  # 2 layers: no two depths below it
    arch = json.loads(small.read_text())
    arch["text_config"]["num_hidden_layers"] = 4
    small.write_text(json.dumps(arch))
    with pytest.raises(ValueError, match=r"layers: two different depths between 1 and 3"):
        run_dry_run(CONFIGS / "pmtp" / "janus_pro_7b_coco.yaml", architecture=str(small), layers=layers)


def test_a_bad_yaml_fails_as_the_recipe_would(tmp_path):
    bad = _write_yaml(tmp_path / "pmtp" / "bad.yaml", {"dataset": "shapes", "lerning_rate": 0.1, "output_dir": "x"})
    with pytest.raises(ValueError, match="lerning_rate"):
        run_dry_run(bad, work_dir=tmp_path)
    assert not list(tmp_path.glob("echogen-dry-run-*"))


def test_gpu_estimate_adds_the_parts_and_shards_what_the_launch_config_shards():
    measured = {
        "parameters": {"weights_bytes": 400, "trainable_bytes": 100, "trainable": 25},
        "steps": [{"forward_bytes": 30}],
        "per_device_batch": 2,
    }
    args = SimpleNamespace(optim="adamw_torch", per_device_train_batch_size=8, beta=0.04)
    plain = estimate_gpu_memory(measured, "pmtp", args, SimpleNamespace(use_peft=False), None)
    assert (plain["activations_bytes"], plain["optimizer_bytes"], plain["single_device_bytes"]) == (120, 200, 820)
    zero2 = (
        "zero2.yaml",
        {"distributed_type": "DEEPSPEED", "num_processes": 4, "deepspeed_config": {"zero_stage": 2}},
    )
    sharded = estimate_gpu_memory(measured, "pmtp", args, SimpleNamespace(use_peft=False), zero2)
    assert sharded["sharded_bytes"] == 400 + 100 / 4 + 200 / 4 + 120
    assert sharded["sharded_formula"] == "weights + gradients/4 + optimizer/4 + activations"
    fsdp = ("fsdp.yaml", {"distributed_type": "FSDP", "num_processes": 4})
    assert (
        estimate_gpu_memory(measured, "djo", args, SimpleNamespace(use_peft=False), fsdp)["sharded_bytes"]
        == 700 / 4 + 120
    )
    units = {**measured, "parameters": {**measured["parameters"], "total": 100, "root_unit": 10, "decoder_layer": 5}}
    bf16 = SimpleNamespace(**vars(args), bf16=True)
    gathered = estimate_gpu_memory(units, "cyclerl", bf16, SimpleNamespace(use_peft=False), fsdp)
    assert gathered["gathered_bytes"] == 2 * (10 + 2 * 5 + 100)  # in bf16, with TRL's one-unit reference whole
    assert gathered["sharded_bytes"] == 800 / 4 + 100 / 4 + 200 / 4 + 120 + 2 * (10 + 2 * 5 + 100)
    assert estimate_gpu_memory(units, "pmtp", bf16, SimpleNamespace(use_peft=False), fsdp)["gathered_bytes"] == 40
    full = estimate_gpu_memory(measured, "cyclerl", args, SimpleNamespace(use_peft=False), None)
    assert full["reference_model"] and full["weights_bytes"] == 800  # beta > 0 without LoRA: a reference copy
    assert not estimate_gpu_memory(measured, "cyclerl", args, SimpleNamespace(use_peft=True), None)["reference_model"]
    eight_bit = SimpleNamespace(optim="adamw_8bit", per_device_train_batch_size=8, beta=0.0)
    assert (
        estimate_gpu_memory(measured, "pmtp", eight_bit, SimpleNamespace(use_peft=False), None)["optimizer_bytes"]
        == 50
    )


def _dry_run_in_a_fresh_process(config: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    """`echogen-rl dry-run` of `config` in its own interpreter, as a user runs it: each real-size run starts from an
    empty heap (one after another in this process, what earlier ones freed stays with it, and the 2-layer Janus-Pro-7B
    step, 19.6 GB alone, was killed for memory at 24 GB)."""
    argv = ["dry-run", "--config", str(config.resolve()), "--steps", "1", "--work-dir", str(work), *args]
    return subprocess.run(
        [sys.executable, "-m", "echogen_rl.cli", *argv], cwd=work, capture_output=True, text=True, timeout=3 * 3600
    )


@pytest.mark.slow
@pytest.mark.xdist_group("real_size")  # one worker runs them one after another: two at once exceed 24 GiB
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_real_size_dry_run_of_every_gpu_config(config, tmp_path):
    """One real-size step of each GPU config (Janus-Pro-1B, random init; Janus-Pro-7B at two depths). On a 2-core CPU 4 to 35 minutes each and
    up to about 20 GiB of RAM (float32 compute; full fine-tuning steps without optimizer state, see
    `cpu_adjustments`). DJO and CycleRL find their architecture through the PMTP / DJO config that makes their start
    checkpoint."""
    report_file = tmp_path / "report.json"
    if (
        config.name == "janus_pro_1b_full.yaml"
        and not torch.cuda.is_available()
        and psutil.virtual_memory().total < 32 * 2**30
    ):
        # Policy and reference in float32 plus gradients: 21 GiB before activations (killed for memory at 24 GiB).
        done = _dry_run_in_a_fresh_process(config, tmp_path, "--json", str(report_file))
        assert done.returncode == 2 and "killed for memory" in done.stderr, done.stderr[-2000:]
        assert not report_file.exists()
        return
    layers = ("--layers", "1", "2") if "7b" in config.name else ()  # 7B at its width and 1, 2 of its 30 layers
    done = _dry_run_in_a_fresh_process(config, tmp_path, "--json", str(report_file), *layers)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(report_file.read_text())
    if layers:
        assert report["measured"]["depth"]["layers"] == 30 and report["measured"]["parameters"]["total"] > 7.0e9
        assert report["estimate"]["launch"]["kind"] == "FSDP"
    _check_report(report, steps=1)
    assert report["measured"]["parameters"]["total"] > 2.0e9
    assert report["estimate"]["single_device_bytes"] > report["estimate"]["weights_bytes"]


# Full fine-tuning of Janus-Pro-1B in float32 with AdamW takes about 27 GiB: AdamW's states are dropped (SGD) where
# that exceeds 70% of the memory, and the run is refused where weights and gradients alone (14.0 GiB) exceed 85%.
@pytest.mark.parametrize(
    "memory_gib, full_fine_tuning",
    [(16, "refused"), (24, {"bf16": False, "optim": "sgd"}), (64, {"bf16": False}), (128, {"bf16": False})],
)
def test_cpu_adjustments_compute_in_float32_and_drop_adamw_states_only_where_they_cannot_fit(
    memory_gib, full_fine_tuning, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    memory = SimpleNamespace(total=memory_gib * 2**30)  # the machine's memory is what the code reads, faked
    monkeypatch.setattr("echogen_rl.experiments.dry_run.psutil.virtual_memory", lambda: memory)
    big = resolve_architecture("deepseek-community/Janus-Pro-1B")
    full = SimpleNamespace(bf16=True, beta=0.0, optim="adamw_torch_fused")
    fp32 = SimpleNamespace(use_peft=False, dtype="float32")
    if full_fine_tuning == "refused":
        with pytest.raises(ValueError, match=r"weights and gradients alone take 14\.0 GiB"):
            cpu_adjustments(big, "pmtp", full, fp32)
    else:
        assert cpu_adjustments(big, "pmtp", full, fp32) == full_fine_tuning
    assert cpu_adjustments(big, "cyclerl", full, SimpleNamespace(use_peft=True, dtype="float32")) == {"bf16": False}
    tiny = resolve_architecture("outputs/tiny-janus", build_tiny_if_missing=True)
    assert cpu_adjustments(tiny, "pmtp", SimpleNamespace(bf16=False, beta=0.0, optim="adamw_torch"), fp32) == {}


def test_cpu_dry_run_that_cannot_fit_is_refused_before_it_starts(monkeypatch):
    """Full fine-tuning with a float32 reference model: weights 2 x 7.7 GiB and gradients 5.5 GiB (measured: such a
    run was killed for memory at 24 GiB)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    big = resolve_architecture("deepseek-community/Janus-Pro-1B")
    fp32 = SimpleNamespace(use_peft=False, dtype="float32")
    with_reference = SimpleNamespace(bf16=True, beta=0.04, optim="adamw_torch_fused")
    memory = SimpleNamespace(total=24 * 2**30)
    monkeypatch.setattr("echogen_rl.experiments.dry_run.psutil.virtual_memory", lambda: memory)
    with pytest.raises(ValueError, match=r"policy and reference model\) and gradients alone take 21\.\d GiB"):
        cpu_adjustments(big, "cyclerl", with_reference, fp32)
    assert cpu_adjustments(big, "cyclerl", SimpleNamespace(bf16=True, beta=0.0, optim="adamw_torch"), fp32)["optim"]
    memory.total = 32 * 2**30  # enough for both copies and the gradients: adjusted, not refused
    assert cpu_adjustments(big, "cyclerl", with_reference, fp32) == {"bf16": False, "optim": "sgd"}


def test_memory_that_fell_with_depth_is_not_extrapolated_below_the_shallow_run():
    """A CPU's RSS is noisy: a 2-layer run that measured less forward memory than the 1-layer one must not give a
    30-layer estimate below 0 (a Janus-Pro-7B PMTP dry run did: activations -100 GB, the whole estimate under its
    weights)."""
    params = {"total": 10, "trainable": 10, "weights_bytes": 40, "trainable_bytes": 40}

    def run(layers, forward, peak):
        step = {"seconds": float(layers), "start_bytes": 100, "forward_bytes": forward, "gradients_bytes": 40 * layers}
        scaled = {k: v * layers for k, v in params.items()}
        return layers, {"parameters": scaled, "steps": [{**step, "peak_bytes": peak}], "process_peak_bytes": peak}

    grows = extrapolate_depth([run(1, 50, 300), run(2, 80, 400)], depth=30)
    assert grows["steps"][0]["forward_bytes"] == 50 + 30 * 29 and grows["depth"]["flat"] == []
    fell = extrapolate_depth([run(2, 70, 380), run(1, 90, 300)], depth=30)
    assert fell["steps"][0]["forward_bytes"] == 90 and fell["depth"]["flat"] == ["forward_bytes"]
    assert fell["parameters"]["weights_bytes"] == 40 * 30 and fell["process_peak_bytes"] == 300 + 80 * 29
