"""An unreadable checkpoint is one line naming the file and what is wrong (exit status 2), in every command that
loads one; `--debug` shows the traceback."""

import shutil

import pytest
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import JanusForConditionalGeneration

from echogen_rl.cli import main
from echogen_rl.models.loading import CheckpointError, check_checkpoint, load_janus


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _commands(model, tmp_path):
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    box = ["--box", "red circle:0.1,0.1,0.5,0.5"]
    return {
        "generate": ["generate", "--model", str(model), *box, "--out", str(tmp_path / "g.png"), "--num", "1"],
        "ground": ["ground", "--model", str(model), "--image", str(image), "--phrases", "red circle", "--palette"],
        "eval": ["eval", "--model", str(model), "--num-layouts", "2", "--output-dir", str(tmp_path / "eval")],
        "export": ["export", "--checkpoint", str(model), "--output", str(tmp_path / "export")],
    }


@pytest.mark.parametrize(
    "damage,file,reason",
    [
        (lambda c: _truncate(c / "config.json"), "config.json", "not valid JSON"),
        (lambda c: _truncate(c / "model.safetensors"), "model.safetensors", "not a readable safetensors file"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors", "not a readable"),
        (lambda c: _truncate(c / "tokenizer.json", 0.9), "tokenizer.json", "not valid JSON"),
    ],
)
def test_every_command_names_the_unreadable_file_in_one_line(checkpoint, tmp_path, capsys, damage, file, reason):
    damage(checkpoint)
    for name, argv in _commands(checkpoint, tmp_path).items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert f"echogen-rl {name}: error: {checkpoint / file}: {reason}" in err, (name, err)
    with pytest.raises(CheckpointError, match=reason):
        main(["--debug", *_commands(checkpoint, tmp_path)["generate"]])


def test_a_config_json_that_transformers_cannot_read_is_named(checkpoint):
    (checkpoint / "config.json").write_text('{"model_type": "janus", "text_config": 7}')
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: cannot be loaded \("):
        load_janus(str(checkpoint))


def test_a_corrupt_adapter_is_named(checkpoint, tmp_path, capsys):
    model = JanusForConditionalGeneration.from_pretrained(checkpoint)
    adapter = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    check_checkpoint(adapter)  # intact: no error
    _truncate(adapter / "adapter_model.safetensors")
    argv = ["export", "--checkpoint", str(adapter), "--output", str(tmp_path / "out"), "--base", str(checkpoint)]
    assert main(argv) == 2
    assert f"{adapter / 'adapter_model.safetensors'}: not a readable safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written
