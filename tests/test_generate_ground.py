import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.cli import main
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.eval.inference import generate_images
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.export import attach_adapter, export_checkpoint
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.image_tokenizers import PaletteTokenizer
from echogen_rl.models.loading import DEFAULT_LORA_TARGETS
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.tiny import TinyJanusConfig, build_tiny_checkpoint

BOXES = ["red square:0.1,0.1,0.5,0.5", "blue circle:0.5,0.5,0.9,0.9"]
LAYOUT = Layout([Entity("red square", (0.1, 0.1, 0.5, 0.5)), Entity("blue circle", (0.5, 0.5, 0.9, 0.9))], "shapes")


def _palette_codes(path) -> torch.Tensor:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return PaletteTokenizer(8, 4).encode([image.convert("RGB")])[0]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_checkpoint):
    """A LoRA adapter with random B weights (a trained-looking adapter without training)."""
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator: the same adapter in any test order
    model = get_peft_model(
        JanusForConditionalGeneration.from_pretrained(tiny_checkpoint),
        LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_LORA_TARGETS),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    return folder


def test_generate_writes_the_sampled_images_and_a_grid(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pics" / "sample.png"
    argv = ["generate", "--model", str(tiny_checkpoint), "--caption", "shapes", "--out", str(out)]
    argv += ["--box", BOXES[0], "--box", BOXES[1], "--num", "3", "--seed", "1", "--palette"]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out

    model = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    # No --guidance-scale: the tiny checkpoint records 1 (it has no unconditional branch).
    expected = generate_images(model, tokenizer, [LAYOUT] * 3, guidance_scale=1.0, seed=1)
    written = torch.stack([_palette_codes(out.with_name(f"sample-{i}.png")) for i in range(3)])
    assert torch.equal(written, expected)  # the files are the model's samples for this layout and seed
    assert len(expected.unique()) > 1
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.size == (3 * (256 + 4) + 4, 256 + 8)  # three tiles with the boxes
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "sample-0.png",
        "sample-1.png",
        "sample-2.png",
        "sample.png",
    ]


def test_generate_reads_a_layout_file_and_decodes_with_the_vq_model(tiny_checkpoint, tmp_path, caplog):
    layout_file = tmp_path / "layout.json"
    layout_file.write_text(LAYOUT.to_json())
    out = tmp_path / "vq.png"
    argv = ["generate", "--model", str(tiny_checkpoint), "--layout", str(layout_file), "--out", str(out), "--num", "1"]
    assert main(argv) == 0
    assert "pass --palette" in caplog.text
    with Image.open(tmp_path / "vq-0.png") as image:
        assert image.format == "PNG" and image.size == (32, 32)  # the tiny VQ decoder's 8x8 codes of 4 pixels


def test_generate_with_an_adapter_equals_the_merged_export(tiny_checkpoint, adapter, tmp_path):
    merged = export_checkpoint(adapter, tmp_path / "merged", merge=True)
    common = ["--box", BOXES[0], "--num", "2", "--palette", "--temperature", "0.7"]
    base = ["generate", "--model", str(tiny_checkpoint)]
    assert main([*base, "--adapter", str(adapter), "--out", str(tmp_path / "a.png"), *common]) == 0
    assert main(["generate", "--model", str(merged), "--out", str(tmp_path / "m.png"), *common]) == 0
    assert main([*base, "--out", str(tmp_path / "b.png"), *common]) == 0
    with_adapter = [_palette_codes(tmp_path / f"a-{i}.png") for i in range(2)]
    assert all(torch.equal(a, _palette_codes(tmp_path / f"m-{i}.png")) for i, a in enumerate(with_adapter))
    assert not all(torch.equal(a, _palette_codes(tmp_path / f"b-{i}.png")) for i, a in enumerate(with_adapter))


def test_ground_prints_the_grounders_answer_and_draws_it(tiny_checkpoint, adapter, tmp_path, capsys):
    sample = build_shapes_dataset(1, seed=3)[0]
    codes = torch.tensor([sample["image_codes"]])
    image = tmp_path / "shapes.png"
    PaletteTokenizer(8, 4).decode(codes)[0].save(image)
    phrases = Layout.from_json(sample["layout"]).phrases
    argv = ["ground", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--image", str(image), "--palette"]
    assert main([*argv, "--phrases", " ; ".join(phrases), "--draw", str(tmp_path / "drawn.png")]) == 0
    printed = json.loads(capsys.readouterr().out)

    model = attach_adapter(JanusForConditionalGeneration.from_pretrained(tiny_checkpoint), adapter)
    prompts = PromptBuilder(AutoTokenizer.from_pretrained(tiny_checkpoint), 64)
    expected = Grounder(model.merge_and_unload().eval(), prompts)(codes, [phrases])[0]
    assert len(set(expected.text.split())) > 2  # the adapter makes the answer vary: agreeing on it means something
    assert printed["phrases"] == phrases and printed["text"] == expected.text
    assert printed["layout"] == expected.layout.to_dict() and printed["problems"] == expected.problems
    with Image.open(tmp_path / "drawn.png") as drawn:
        assert drawn.format == "PNG" and drawn.size == (256, 256)

    assert main(["ground", "--model", str(tiny_checkpoint), "--image", str(image), "--detect"]) == 0  # VQ encoder
    printed = json.loads(capsys.readouterr().out)
    assert printed["phrases"] is None and isinstance(printed["problems"], list)
    Layout.from_dict(printed["layout"])


def test_bad_inputs_exit_with_status_2_naming_the_culprit(tiny_checkpoint, adapter, tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of loading
        assert line.startswith(f"echogen-rl {argv[0]}: error:")
        return line

    model = str(tiny_checkpoint)
    gen = ["generate", "--model", model, "--out", str(tmp_path / "x.png")]
    for box, message in [
        ("red:0.1,0.2,1.5,0.6", "field 'box' x2 = 1.5 is outside [0, 1]"),
        ("red:0.5,0.2,0.4,0.6", "field 'box' has x2 <= x1"),
        ("red 0.1,0.2,0.3,0.4", 'expected "phrase:x1,y1,x2,y2"'),
        ("red:0.1,0.2,0.3", "expected 4 numbers"),
        ("red:0.1,a,0.3,0.4", "'0.1,a,0.3,0.4' holds a non-number"),
    ]:
        assert f"--box {box!r}: {message}" in error(*gen, "--box", BOXES[0], "--box", box)
    bad_file = tmp_path / "bad.json"
    bad_file.write_text('{"entities": [{"phrase": "red", "box": [0.1, 0.1, 0.05, 0.5]}]}')
    assert f"--layout {bad_file}: entity 0: field 'box' has x2 <= x1" in error(*gen, "--layout", str(bad_file))
    assert "--out" in error("generate", "--model", model, "--out", str(tmp_path / "x.jpg"), "--box", BOXES[0])
    missing = str(tmp_path / "no-model")
    assert f"--model {missing}: no such checkpoint directory" in error(
        "generate", "--model", missing, "--out", str(tmp_path / "x.png"), "--box", BOXES[0]
    )
    narrow = build_tiny_checkpoint(tmp_path / "narrow", TinyJanusConfig(hidden_size=64, codebook_size=16))
    narrow_gen = ["generate", "--model", str(narrow), "--out", str(tmp_path / "x.png"), "--box", BOXES[0]]
    assert f"{adapter} is an adapter for another base model" in error(*narrow_gen, "--adapter", str(adapter))
    assert "--palette: the model's codebook has 16 codes" in error(*narrow_gen, "--palette")
    assert not list(tmp_path.glob("x*"))

    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    ground = ["ground", "--model", model, "--image"]
    assert f"--image {not_image}: not a readable image" in error(*ground, str(not_image), "--detect")
    absent = tmp_path / "absent.png"
    assert f"--image {absent}: no such file" in error(*ground, str(absent), "--detect")
    assert "--phrases 'red;;blue'" in error(*ground, str(not_image), "--phrases", "red;;blue")


def test_load_trained_merges_a_runs_adapter_into_its_base_and_asks_for_the_base(tiny_checkpoint, adapter):
    from echogen_rl.models.loading import load_trained

    merged, _ = load_trained(adapter, tiny_checkpoint)
    expected = attach_adapter(JanusForConditionalGeneration.from_pretrained(tiny_checkpoint), adapter)
    expected = expected.merge_and_unload().state_dict()
    assert not merged.training and merged.state_dict().keys() == expected.keys()
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in expected.items())
    base, _ = load_trained(tiny_checkpoint)  # a full checkpoint loads as it is
    assert any(not torch.equal(base.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match=f"{adapter} holds a LoRA adapter: pass the model it was trained on"):
        load_trained(adapter)
