import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.cli import main
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.layout import Layout
from echogen_rl.models import export
from echogen_rl.models.loading import DEFAULT_LORA_TARGETS
from echogen_rl.models.modeling import image_logits, mixed_forward, text_logits
from echogen_rl.models.prompts import IGNORE_INDEX, PromptBuilder, pad_segments
from echogen_rl.models.tiny import TinyJanusConfig, build_tiny_checkpoint
from echogen_rl.rollout.torch_engine import TorchRolloutEngine
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint):
    """A real PMTP trainer output (LoRA, 2 steps, checkpoint-2) on a randomized base, whose outputs vary."""
    root = tmp_path_factory.mktemp("export")
    base = root / "base"
    # std 0.1, not conftest's 0.2: at 0.2 the tiny network amplifies float32 rounding to ~5e-5 in the logits (the
    # PEFT model in float32 against float64), above the 1e-5 asked of a merge; at 0.1 that floor is ~4e-6.
    model = randomize_(JanusForConditionalGeneration.from_pretrained(tiny_checkpoint), std=0.1)
    model.save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.save_pretrained(base)
    args = PMTPConfig(
        output_dir=str(root / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="steps",
        save_steps=2,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS)
    trainer = PMTPTrainer(
        JanusForConditionalGeneration.from_pretrained(base),
        args,
        train_dataset=build_shapes_dataset(8, seed=0),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    return SimpleNamespace(root=root, base=base, run=root / "run", model=trainer.model.eval(), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def batch(trained):
    """An L2I turn with its image and an I2L turn with its answer: targets for both heads."""
    prompts = PromptBuilder(trained.tokenizer, num_image_tokens=64)
    data = build_shapes_dataset(2, seed=5)
    layouts = [Layout.from_json(text) for text in data["layout"]]
    segments = [prompts.l2i(layouts[0], data["image_codes"][0]), prompts.i2l(data["image_codes"][1], layouts[1])]
    return pad_segments(segments, prompts.pad_id, "left"), prompts, layouts


@torch.no_grad()
def _logits(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    data, _, _ = batch
    hidden = mixed_forward(model, data["input_ids"], data["image_mask"], data["attention_mask"])
    return (
        image_logits(model, hidden[data["image_labels"] != IGNORE_INDEX]),
        text_logits(model, hidden[data["text_labels"] != IGNORE_INDEX]),
    )


def _greedy_codes(model, batch) -> torch.Tensor:
    _, prompts, layouts = batch
    engine = TorchRolloutEngine(model, 64, prompts.bos_id, prompts.boi_id, prompts.pad_id)
    rows = pad_segments([prompts.l2i_prompt(layout) for layout in layouts], prompts.pad_id, "left")
    return engine.generate(rows["input_ids"], rows["attention_mask"], guidance_scale=5.0, temperature=0).codes


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_adapter_and_merged_exports_compute_what_the_trained_model_computes(trained, batch, tmp_path):
    reference = _logits(trained.model, batch)
    with trained.model.disable_adapter():
        untrained = _logits(trained.model, batch)
    assert _max_diff(reference, untrained) > 1e-2  # the adapter changes the model: the comparisons below can fail
    codes = _greedy_codes(trained.model, batch)
    assert len(codes.unique()) > 1

    adapter_dir = export.export_checkpoint(trained.run / "checkpoint-2", tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in adapter_dir.iterdir()}
    reloaded = PeftModel.from_pretrained(JanusForConditionalGeneration.from_pretrained(trained.base), adapter_dir)
    reloaded.eval()
    diff = _max_diff(_logits(reloaded, batch), reference)
    print(f"adapter export: max |logit difference| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert torch.equal(_greedy_codes(reloaded, batch), codes)

    merged_dir = export.export_checkpoint(trained.run, tmp_path / "merged", merge=True)
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "generation_config.json").exists()
    merged = JanusForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert len(AutoTokenizer.from_pretrained(merged_dir)) == len(trained.tokenizer)
    diff = _max_diff(_logits(merged, batch), reference)
    print(f"merged export: max |logit difference| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert torch.equal(_greedy_codes(merged, batch), codes)

    card = ModelCard.load(merged_dir / "README.md")
    assert card.data.base_model == str(trained.base) and "pmtp" in card.data.tags
    assert "Stage: **pmtp**" in card.text and "| loss_img |" in card.text and "global_step: 2" in card.text


def test_export_refuses_to_overwrite_and_replaces_with_overwrite(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_checkpoint(trained.run, out)
    assert (out / "keep.txt").read_text() == "mine"
    export.export_checkpoint(trained.run, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_no_output(trained, tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    written = []

    def fail(card, folder):  # the last step: the weights and the tokenizer are already written
        written.extend(p.name for p in folder.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_model_card", fail)
    with pytest.raises(KeyboardInterrupt):
        export.export_checkpoint(trained.run, out, merge=True, overwrite=True)
    assert "model.safetensors" in written  # it did fail midway
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old output is untouched
    else:
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])  # no temporary folder left


def test_full_model_exports_without_merge_only(trained, tmp_path, capsys):
    merged = export.export_checkpoint(trained.run, tmp_path / "merged", merge=True)
    assert main(["export", "--checkpoint", str(merged), "--output", str(tmp_path / "again"), "--merge"]) == 2
    assert f"{merged} holds a full model" in capsys.readouterr().err
    again = export.export_checkpoint(merged, tmp_path / "again")
    assert "pmtp" in ModelCard.load(again / "README.md").data.tags  # the stage survives a second export
    JanusForConditionalGeneration.from_pretrained(again)


def test_export_errors_name_the_culprit(trained, tmp_path, capsys):
    def run(*args: str) -> str:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of loading
        assert err.startswith("echogen-rl export: error:")
        return err

    out = str(tmp_path / "out")
    assert f"{tmp_path / 'nowhere'}: no such directory" in run(
        "--checkpoint", str(tmp_path / "nowhere"), "--output", out
    )
    only_steps = tmp_path / "run"
    shutil.copytree(trained.run / "checkpoint-2", only_steps / "checkpoint-2")
    assert "it holds checkpoint-2: pass one of them" in run("--checkpoint", str(only_steps), "--output", out)

    moved = tmp_path / "moved"
    shutil.copytree(trained.run, moved, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    err = run("--checkpoint", str(moved), "--output", out)
    assert f"base model {tmp_path / 'gone'}" in err and "--base" in err
    assert main(["export", "--checkpoint", str(moved), "--output", out, "--base", str(trained.base)]) == 0
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        trained.base
    )

    # PEFT itself loads an adapter for a deeper model into a shallower one, dropping the extra layers' weights.
    shallow = build_tiny_checkpoint(tmp_path / "shallow", TinyJanusConfig(num_layers=2))
    err = run("--checkpoint", str(trained.run), "--output", str(tmp_path / "x"), "--base", str(shallow))
    assert "adapter for another base model" in err and "layers.2" in err
    narrow = build_tiny_checkpoint(tmp_path / "narrow", TinyJanusConfig(hidden_size=64))
    err = run("--checkpoint", str(trained.run), "--output", str(tmp_path / "x"), "--base", str(narrow))
    assert "adapter for another base model" in err and "size mismatch" in err
    step = str(trained.run / "checkpoint-2")
    assert "would replace the checkpoint" in run("--checkpoint", step, "--output", str(trained.run), "--overwrite")
    assert not (tmp_path / "x").exists()
