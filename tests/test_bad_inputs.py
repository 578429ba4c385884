"""Bad inputs end in a clear error naming the culprit, or in a counted skip; nothing else is lost.

Covered elsewhere and not repeated here: fuzzed layout *text* (tests/test_layout.py), broken and missing COCO images
through `encode_image_codes` and unreadable LayoutSAM rows (tests/test_sources.py), a reward returning the wrong
number of values (tests/test_cyclerl.py) and `NamedReward` on its own (tests/test_rewards.py).
"""

import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import JanusForConditionalGeneration

from echogen_rl.data.collators import PMTPCollator
from echogen_rl.data.common import BadSampleWarning, FilterStats
from echogen_rl.data.random_layouts import build_random_layout_dataset
from echogen_rl.data.shapes import build_shapes_dataset, phrase_pool
from echogen_rl.data.sources import CycleRLDataArguments, LayoutDataArguments, build_layout_datasets
from echogen_rl.layout import Entity, Layout, LayoutError
from echogen_rl.models.image_tokenizers import PaletteTokenizer
from echogen_rl.models.loading import JanusModelConfig
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.models.palette import PALETTE
from echogen_rl.rewards import RewardError
from echogen_rl.scripts.runner import ConfigTypeError, RecipeParser
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Layout JSON: `Layout.from_json` (and `validate`) raise LayoutError or nothing, whatever the text.


def _parse_json_layout(text):
    """`from_json` then `validate`: a valid Layout, or None after a LayoutError; any other exception fails."""
    try:
        layout = Layout.from_json(text)
        layout.validate()
    except LayoutError:
        return None
    # A layout that validates can be written both ways and read back.
    assert Layout.from_json(layout.to_json()) == layout
    layout.to_text()
    return layout


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=0, max_value=1)
    | st.text(max_size=12)
)
_json_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)
_huge_ints = st.integers(min_value=10**300, max_value=10**400)  # beyond float range from about 1.8e308
_boxes = st.lists(_scalars | _huge_ints, min_size=3, max_size=5) | st.lists(
    st.floats(min_value=0, max_value=1), min_size=4, max_size=4
)
_entities = st.fixed_dictionaries({"phrase": _json_values | st.text(max_size=20), "box": _boxes | _json_values})
_layout_docs = st.fixed_dictionaries(
    {"entities": st.lists(_entities | _json_values, max_size=4) | _json_values},
    optional={"caption": _json_values},
)


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_from_json_on_any_text_raises_layout_error_or_nothing(text):
    _parse_json_layout(text)


@settings(max_examples=1000, deadline=None)
@given(_layout_docs | _json_values)
def test_from_json_on_layout_shaped_json_raises_layout_error_or_nothing(doc):
    _parse_json_layout(json.dumps(doc))


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_from_json_on_corrupted_valid_json_raises_layout_error_or_nothing(data):
    layout = Layout([Entity("red square", (0.1, 0.2, 0.5, 0.6)), Entity("blue circle", (0.5, 0.5, 1.0, 1.0))], "x")
    text = layout.to_json()
    for _ in range(data.draw(st.integers(1, 4))):  # cut, insert or replace a few characters
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 5)))
        text = (
            text[:i]
            + data.draw(st.sampled_from(["", "[", "]", "{", "}", '"', ",", ":", "1e999", "-", "null"]))
            + text[j:]
        )
    _parse_json_layout(text)


@pytest.mark.parametrize(
    "text, culprit",
    [
        # Each raised something other than LayoutError before: OverflowError, ValueError, RecursionError.
        ('{"entities": [{"phrase": "a", "box": [1' + "0" * 400 + ", 0, 1, 1]}]}", "entity 0"),
        ('{"entities": [{"phrase": "a", "box": [' + "9" * 5000 + ", 0, 1, 1]}]}", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('{"entities": [{"phrase": "a", "box": [NaN, 0, 1, 1]}]}', "not finite"),
        ('{"entities": [{"phrase": "a", "box": [0, 0, Infinity, 1]}]}', "not finite"),
        ('{"entities": [{"phrase": "<ref>a", "box": [0, 0, 1, 1]}]}', "contains the tag <ref>"),
        ('{"entities": [{"phrase": "\\ud800", "box": [0.5, 0, 0.5, 1]}]}', "x2 <= x1"),
    ],
)
def test_from_json_edge_cases_are_layout_errors(text, culprit):
    with pytest.raises(LayoutError, match=culprit):
        layout = Layout.from_json(text)
        layout.validate()


def test_collator_names_the_example_whose_layout_json_is_hostile(prompts):
    good = build_shapes_dataset(2, seed=0)[0]
    for layout in ("9" * 5000, "[" * 100_000, '{"entities": [{"phrase": "a", "box": [1' + "0" * 400 + ", 0, 1, 1]}]}"):
        with pytest.raises(ValueError, match=r"example 1 .*bad layout"):
            PMTPCollator(prompts)([good, dict(good, layout=layout)])


# ---------------------------------------------------------------------------------------------------------------
# Corrupted image files in COCO and LayoutSAM folders, through `build_layout_datasets`.

W, H = 40, 30


def _png_bytes(color: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (W, H), PALETTE[color]).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_images(folder: Path) -> dict[str, int]:
    """Two good images and three bad ones: a truncated PNG (its header reads, its pixels do not), an empty file and
    a JPEG name holding text. Returns the good ones' colors."""
    (folder / "good1.png").write_bytes(_png_bytes(1))
    (folder / "good2.png").write_bytes(_png_bytes(2))
    png = _png_bytes(3)
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a jpeg")
    return {"good1.png": 1, "good2.png": 2}


_BAD = ("truncated.png", "empty.png", "text.jpg")
_ORDER = ("good1.png", "truncated.png", "empty.png", "good2.png", "text.jpg")


def _assert_counted_skips(record, train, stats, rows_in):
    messages = [str(w.message) for w in record if issubclass(w.category, BadSampleWarning)]
    for name in _BAD:  # one warning per bad file, naming it
        assert sum(name in m for m in messages) == 1, (name, messages)
    assert len(messages) == len(_BAD)
    # Nothing else lost: both good images are there, with their own codes.
    assert train["caption"] == ["caption good1.png", "caption good2.png"]
    assert train["image_codes"] == [[1] * 64, [2] * 64]
    assert stats.bad_images == len(_BAD) and stats.rows_kept == 2 and stats.rows_in == rows_in


def test_corrupted_coco_images_are_skipped_named_and_counted(tmp_path):
    _write_images(tmp_path)
    images = [{"id": i, "file_name": n, "width": W, "height": H} for i, n in enumerate(_ORDER, 1)]
    boxes = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 20, 15], "iscrowd": 0, "area": 300}
        for i in range(1, 6)
    ]
    captions = [{"id": i, "image_id": i, "caption": f"caption {n}"} for i, n in enumerate(_ORDER, 1)]
    (tmp_path / "instances.json").write_text(
        json.dumps({"images": images, "annotations": boxes, "categories": [{"id": 1, "name": "cat"}]})
    )
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": captions}))
    args = dict(
        dataset="coco",
        coco_instances_file=str(tmp_path / "instances.json"),
        coco_captions_file=str(tmp_path / "captions.json"),
        coco_image_dir=str(tmp_path),
        num_eval_samples=0,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.warns(BadSampleWarning) as record:
        train, eval_dataset, stats = build_layout_datasets(LayoutDataArguments(**args), PaletteTokenizer())
    assert eval_dataset is None
    _assert_counted_skips(record, train, stats, rows_in=5)
    with pytest.raises(ValueError, match="truncated.png"):
        build_layout_datasets(LayoutDataArguments(**args, on_bad_sample="raise"), PaletteTokenizer())


@pytest.mark.parametrize("declared_size", [True, False])
def test_corrupted_layoutsam_images_are_skipped_named_and_counted(tmp_path, declared_size):
    # With a declared size a bad file fails when it is encoded; without one, already when its size is read.
    _write_images(tmp_path)
    size = {"width": W, "height": H} if declared_size else {}
    rows = [
        {"image_path": n, "global_caption": f"caption {n}", "bbox_list": [[0, 0, 20, 15]], "region_captions": ["a"]}
        | size
        for n in _ORDER
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(map(json.dumps, rows)))
    args = dict(
        dataset="layoutsam",
        layoutsam_file=str(tmp_path / "rows.jsonl"),
        layoutsam_image_dir=str(tmp_path),
        num_eval_samples=0,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.warns(BadSampleWarning) as record:
        train, _, stats = build_layout_datasets(LayoutDataArguments(**args), PaletteTokenizer())
    _assert_counted_skips(record, train, stats, rows_in=5)
    # A truncated PNG has a readable header: without a declared size it still fails only when encoded.
    assert stats == FilterStats(rows_in=5, rows_kept=2, bad_images=3)


def test_corrupted_embedded_layoutsam_image_is_named_by_row(tmp_path):
    import datasets

    string, size = datasets.Value("string"), datasets.Value("int32")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "global_caption": string,
            "bbox_list": string,
            "region_captions": string,
            "width": size,
            "height": size,
        }
    )
    png = _png_bytes(4)
    rows = {
        "image": [{"bytes": png, "path": None}, {"bytes": png[: len(png) // 2], "path": None}],
        "global_caption": ["fine", "cut"],
        "bbox_list": ["[[0, 0, 20, 15]]"] * 2,
        "region_captions": ['["a"]'] * 2,
        "width": [W, W],
        "height": [H, H],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    args = LayoutDataArguments(
        dataset="layoutsam", layoutsam_file=str(tmp_path / "saved"), num_eval_samples=0, cache_dir=str(tmp_path / "c")
    )
    with pytest.warns(BadSampleWarning, match=r"row 1\b") as record:
        train, _, stats = build_layout_datasets(args, PaletteTokenizer())
    assert len(record) == 1
    assert train["caption"] == ["fine"] and train["image_codes"] == [[4] * 64]
    assert (stats.bad_images, stats.rows_kept) == (1, 1)


# ---------------------------------------------------------------------------------------------------------------
# Unknown or mistyped YAML keys, for each recipe and its shipped offline config.

RECIPES = {
    "pmtp": ("LayoutDataArguments", "PMTPConfig", "JanusModelConfig"),
    "djo": ("LayoutDataArguments", "DJOConfig", "JanusModelConfig"),
    "cyclerl": ("CycleRLDataArguments", "CycleRLConfig", "JanusModelConfig"),
}
CLASSES = {
    c.__name__: c
    for c in (LayoutDataArguments, CycleRLDataArguments, PMTPConfig, DJOConfig, CycleRLConfig, JanusModelConfig)
}
# A key of another stage is a likely slip when configs are copied between stages.
FOREIGN_KEY = {"pmtp": "loop_weight", "djo": "guidance_scale", "cyclerl": "pack_segments"}


def _parse(stage, tmp_path, **changes):
    names = RECIPES[stage]
    # The recipe parses exactly these dataclasses (recipes are not importable, so read the source).
    assert f"RecipeParser(({', '.join(names)}))" in (ROOT / "echogen_rl" / "scripts" / f"{stage}.py").read_text()
    values = yaml.safe_load((ROOT / "recipes/configs" / stage / "shapes_tiny.yaml").read_text())
    config = tmp_path / f"{stage}.yaml"
    config.write_text(yaml.safe_dump({**values, **changes}))
    parser = RecipeParser(tuple(CLASSES[n] for n in names))
    return parser.parse_args_and_config(["--config", str(config), "--output_dir", str(tmp_path), "--use_cpu"])


@pytest.mark.parametrize("stage", sorted(RECIPES))
def test_unknown_yaml_keys_are_named(stage, tmp_path):
    assert _parse(stage, tmp_path)  # the shipped config itself parses
    with pytest.raises(ValueError, match="--lerning_rate"):
        _parse(stage, tmp_path, lerning_rate=0.1)
    with pytest.raises(ValueError, match=f"--{FOREIGN_KEY[stage]}"):
        _parse(stage, tmp_path, **{FOREIGN_KEY[stage]: 1})


@pytest.mark.parametrize("stage", sorted(RECIPES))
def test_mistyped_yaml_values_are_named(stage, tmp_path):
    for key, value in (("max_steps", "ten"), ("learning_rate", "fast"), ("use_peft", "maybe")):
        with pytest.raises(ConfigTypeError, match=f"{stage}.yaml: key '{key}' has the value '{value}'"):
            _parse(stage, tmp_path, **{key: value})
    with pytest.raises(ValueError, match="dataset must be one of"):
        _parse(stage, tmp_path, dataset="imagenet")


# ---------------------------------------------------------------------------------------------------------------
# Rewards that fail inside a real CycleRL step, and a grounder that answers garbage.


def _cyclerl(model, tokenizer, tmp_path, reward_funcs, prompts=None, trainer_class=CycleRLTrainer):
    config = CycleRLConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        num_generations=4,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        beta=0.0,
        grounding_model="policy",
        seed=0,
    )
    prompts = prompts or build_random_layout_dataset(8, 0, phrase_pool(), grid_size=8)
    return trainer_class(model, reward_funcs, config, train_dataset=prompts, processing_class=tokenizer)


def explode(prompts, completions, **kwargs):
    return [1.0 / 0 for _ in prompts]


def half_nan(prompts, completions, **kwargs):
    return [float("nan") if i % 2 else 1.0 for i in range(len(prompts))]


def as_dict(prompts, completions, **kwargs):
    return {"reward": 1.0}


@pytest.mark.parametrize(
    "func, message",
    [
        (explode, "reward function 'explode' raised ZeroDivisionError"),
        (half_nan, "reward function 'half_nan' returned NaN for completion 1"),
        (as_dict, "reward function 'as_dict' returned dict, expected a list"),
    ],
)
def test_failing_reward_in_a_training_step_is_named(tiny_model, tiny_tokenizer, tmp_path, func, message):
    head = tiny_model.model.generation_head.vision_head.weight.detach().clone()
    trainer = _cyclerl(tiny_model, tiny_tokenizer, tmp_path, ["cycle_iou", func])
    with pytest.raises(RewardError, match=message):
        trainer.train()
    assert torch.equal(head, tiny_model.model.generation_head.vision_head.weight)  # no update from a bad reward


class ScriptedTextHead(torch.nn.Module):
    """Stands in for `lm_head` while grounding: row i answers `answers[i % len(answers)]`, one token per call."""

    def __init__(self, answers: list[list[int]], head: torch.nn.Linear):
        super().__init__()
        self.answers, self.vocab_size, self.step = answers, head.out_features, 0
        self.weight = head.weight  # the grounder reads the device from it

    def forward(self, hidden):
        logits = torch.zeros(hidden.shape[0], self.vocab_size)
        for row in range(hidden.shape[0]):
            answer = self.answers[row % len(self.answers)]
            logits[row, answer[min(self.step, len(answer) - 1)]] = 1.0
        self.step += 1
        return logits


class RecordingCycleRLTrainer(CycleRLTrainer):
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self.recorded = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.recorded_targets = [example["target_layouts"] for example in inputs]
        return self.recorded


def _script_answers(trainer, answers: list[list[int]], monkeypatch):
    """The trainer's grounder answers image i with `answers[i % len(answers)]`, token by token."""
    janus = unwrap_janus(trainer.model)
    ground = trainer._ground

    def scripted_ground(codes, phrases):
        head = janus.lm_head
        janus.lm_head = ScriptedTextHead(answers, head)
        try:
            return ground(codes, phrases)
        finally:
            janus.lm_head = head

    monkeypatch.setattr(trainer, "_ground", scripted_ground)


def _one_phrase_cyclerl(tiny_model, tiny_tokenizer, tmp_path):
    # One phrase per prompt, so that a clean full-image answer parses without problems.
    prompts = build_random_layout_dataset(8, 0, ["red square"], min_entities=1, max_entities=1, grid_size=8)
    return _cyclerl(
        tiny_model, tiny_tokenizer, tmp_path, ["cycle_iou", "grounding_format"], prompts, RecordingCycleRLTrainer
    )


def test_garbage_grounding_scores_zero_and_is_counted(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    trainer = _one_phrase_cyclerl(tiny_model, tiny_tokenizer, tmp_path)
    builder, eos = trainer.layout_prompts, trainer.layout_prompts.eos_id
    clean = builder.encode(Layout([Entity("red square", (0.0, 0.0, 1.0, 1.0))]).to_text()) + [eos]
    garbage = [
        builder.encode("<grounding> <ref> red square </ref> <box> [ 1 , 2") + [eos],  # cut box
        [eos],  # empty answer
        builder.encode("red red square square"),  # no tags, and never ends
        builder.encode("<box> [ 0 , 0 , 1000 , 1000 ] </box>") + [eos],  # a box without its phrase
    ]
    answers = [clean, garbage[0], clean, garbage[1], clean, garbage[2], clean, garbage[3]]
    _script_answers(trainer, answers, monkeypatch)
    trainer.train()

    cycle, form = trainer.recorded[:, 0], trainer.recorded[:, 1]
    is_clean = torch.tensor([i % 2 == 0 for i in range(8)])
    assert torch.equal(cycle[~is_clean], torch.zeros(4)) and torch.equal(form[~is_clean], torch.zeros(4))
    assert torch.equal(form[is_clean], torch.ones(4))
    # A clean full-image answer scores the IoU of the full image with the target box: the target's area.
    areas = torch.tensor(
        [(lambda b: (b[2] - b[0]) * (b[3] - b[1]))(t.entities[0].box) for t in trainer.recorded_targets]
    )
    torch.testing.assert_close(cycle[is_clean], areas[is_clean].float())
    logged = next(h for h in trainer.state.log_history if "grounding/parse_failure_rate" in h)
    assert logged["grounding/parse_failure_rate"] == 0.5 and logged["grounding/problem_rate"] == 0.5
    assert logged["cycle_miou"] == pytest.approx(float(cycle.mean()), abs=1e-6)
    assert math.isfinite(logged["loss"])


def test_a_misnamed_answer_is_a_problem_but_not_a_parse_failure(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    trainer = _one_phrase_cyclerl(tiny_model, tiny_tokenizer, tmp_path)
    builder, eos = trainer.layout_prompts, trainer.layout_prompts.eos_id
    clean = builder.encode(Layout([Entity("red square", (0.0, 0.0, 1.0, 1.0))]).to_text()) + [eos]
    misnamed = builder.encode(Layout([Entity("blue circle", (0.0, 0.0, 1.0, 1.0))]).to_text()) + [eos]
    _script_answers(trainer, [clean, misnamed], monkeypatch)
    trainer.train()

    cycle, form = trainer.recorded[:, 0], trainer.recorded[:, 1]
    # The one box answers the one phrase whatever it was called: the cycle reward keeps it, the format reward does not.
    torch.testing.assert_close(cycle[1::2], cycle[0::2])
    assert torch.equal(form, torch.tensor([1.0, 0.0] * 4))
    logged = next(h for h in trainer.state.log_history if "grounding/problem_rate" in h)
    assert logged["grounding/parse_failure_rate"] == 0.0 and logged["grounding/problem_rate"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint save that fails midway leaves the previous checkpoint loadable and resumable.


def test_interrupted_checkpoint_save_keeps_the_previous_checkpoint(
    tiny_checkpoint, tiny_tokenizer, tmp_path, monkeypatch
):
    shapes = build_shapes_dataset(16, seed=0)
    out = tmp_path / "out"

    def make(model_path):
        config = PMTPConfig(
            output_dir=str(out),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            save_strategy="steps",
            save_steps=2,
            save_total_limit=1,  # the old checkpoint must outlive a failed new one
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            seed=0,
        )
        model = JanusForConditionalGeneration.from_pretrained(model_path)
        return PMTPTrainer(model, config, train_dataset=shapes, processing_class=tiny_tokenizer)

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        # The weights of checkpoint-4 are written; the optimizer state that follows hits a full disk.
        if "checkpoint-4" in str(f):
            raise OSError("No space left on device (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    trainer = make(tiny_checkpoint)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)
    after_four_steps = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    previous, partial = out / "checkpoint-2", out / "checkpoint-4"
    assert not (partial / "trainer_state.json").exists()  # the failed one is visibly incomplete
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (previous / name).exists(), name
    reloaded = JanusForConditionalGeneration.from_pretrained(previous)  # plain transformers loads it
    assert not torch.equal(
        reloaded.model.generation_head.vision_head.weight,
        JanusForConditionalGeneration.from_pretrained(tiny_checkpoint).model.generation_head.vision_head.weight,
    )
    resumed = make(tiny_checkpoint)
    resumed.train(resume_from_checkpoint=str(previous))
    assert resumed.state.global_step == 4
    for name, expected in after_four_steps.items():  # the two lost steps are redone exactly
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], expected, atol=1e-6, rtol=0)
