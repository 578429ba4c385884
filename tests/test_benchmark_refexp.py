import json
import math

import numpy as np
import pytest
from conftest import randomize_
from PIL import Image

from echogen_rl.eval.benchmarks import refexp
from echogen_rl.eval.benchmarks.refexp import (
    PAD_COLOR,
    box_iou,
    evaluate_refexp,
    letterbox,
    load_referring_expressions,
    refexp_accuracy,
    to_pixels,
)
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.grounding import GroundingResult
from echogen_rl.models.image_tokenizers import JanusVQTokenizer
from echogen_rl.models.loading import load_model


def test_accuracy_matches_hand_computed_values_and_counts_only_ious_above_a_threshold():
    targets = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 4, 4), (0, 0, 10, 10), (10, 10, 20, 20)]
    predicted = [
        (0, 0, 10, 10),  # IoU 1
        (0, 0, 10, 5),  # IoU 0.5 exactly: misses Acc@0.5, as Ref-L4 counts `iou > t`
        (0, 0, 4, 3),  # IoU 0.75 exactly: hits 0.50 .. 0.70, misses 0.75
        None,  # no box: IoU 0
        (12, 10, 20, 20),  # IoU 0.8: hits 0.50 .. 0.75
    ]
    assert [box_iou(p, t) for p, t in zip(predicted[:3], targets)] == [1.0, 0.5, 0.75]
    metrics = refexp_accuracy(predicted, targets)
    assert metrics["acc50"] == 3 / 5
    assert metrics["acc75"] == 2 / 5
    assert metrics["acc90"] == 1 / 5
    # Hits per item over the ten thresholds 0.50 .. 0.95: 10 + 0 + 5 + 0 + 6.
    assert metrics["macc"] == pytest.approx(21 / 50, abs=1e-12)
    assert metrics["miou"] == pytest.approx((1 + 0.5 + 0.75 + 0 + 0.8) / 5, abs=1e-12)
    assert metrics["count"] == 5


def test_accuracy_rejects_unpaired_or_empty_inputs():
    with pytest.raises(ValueError, match="2 predicted boxes for 1 targets"):
        refexp_accuracy([None, None], [(0, 0, 1, 1)])
    with pytest.raises(ValueError, match="no predicted"):
        refexp_accuracy([], [])


@pytest.mark.parametrize("size", [(45, 20), (20, 51)], ids=["wide", "tall"])
def test_letterbox_keeps_the_whole_image_and_to_pixels_inverts_it(size):
    width, height = size
    box = (5, 3, 14, 17)  # pixel xyxy, exclusive of x2 and y2
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), box)
    square, (left, top, side) = letterbox(image)
    assert square.size == (side, side) == (max(size), max(size))
    assert (left, top) == ((side - width) // 2, (side - height) // 2)
    pixels = np.asarray(square)
    assert tuple(pixels[0, 0]) == PAD_COLOR  # the top-left corner is padding on either shape
    # Every pixel of the original is on the square: the blue count is the image minus the box.
    blue = (pixels == (0, 0, 255)).all(-1).sum()
    assert blue == width * height - (box[2] - box[0]) * (box[3] - box[1])
    ys, xs = np.nonzero((pixels == (255, 0, 0)).all(-1))
    drawn = (xs.min() / side, ys.min() / side, (xs.max() + 1) / side, (ys.max() + 1) / side)
    expected = ((box[0] + left) / side, (box[1] + top) / side, (box[2] + left) / side, (box[3] + top) / side)
    assert drawn == pytest.approx(expected, abs=1e-12)
    # Back through the 1000-step grid of layout text, as the model writes boxes.
    written = tuple(round(v * 1000) / 1000 for v in drawn)
    assert to_pixels(written, left, top, side, width, height) == pytest.approx(box, abs=1.0)
    assert to_pixels(drawn, left, top, side, width, height) == pytest.approx(box, abs=1e-9)
    # A box over the whole square ends at the image's edges, not in the padding.
    assert to_pixels((0.0, 0.0, 1.0, 1.0), left, top, side, width, height) == (0.0, 0.0, width, height)


def _write_image(folder, name, size, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)


def test_loads_ref_l4_and_refcoco_shapes(tmp_path):
    _write_image(tmp_path, "o365_1.png", (40, 24))
    _write_image(tmp_path, "000000000042.jpg", (30, 50))
    ref_l4 = {
        "annotations": [
            {"id": "a", "file_name": "o365_1.png", "caption": " the  red\nsquare ", "bbox": [2, 3, 10, 5]},
            {
                "id": "b",
                "file_name": "o365_1.png",
                "caption": "edge",
                "bbox": [30, 0, 10.4, 24],
                "width": 40,
                "height": 24,
            },
        ]
    }
    (tmp_path / "ref-l4-val.json").write_text(json.dumps(ref_l4))
    a, b = load_referring_expressions(tmp_path / "ref-l4-val.json", tmp_path)
    assert (a.id, a.image_path, a.expression) == ("a", tmp_path / "o365_1.png", "the red square")
    assert (a.box, a.width, a.height) == ((2.0, 3.0, 12.0, 8.0), 40, 24)  # size read from the image header
    assert b.box == (30.0, 0.0, 40.0, 24.0)  # over the edge by 0.4 px: clipped
    refcoco = [
        {"ref_id": 7, "image_id": 42, "sentences": [{"sent": "left dog"}, {"sent": "dog"}], "bbox": [0, 0, 30, 50]},
        {"image_id": 42, "expression": "right dog", "bbox": [1, 1, 2, 2]},
    ]
    (tmp_path / "refcoco.json").write_text(json.dumps(refcoco))
    first, second = load_referring_expressions(tmp_path / "refcoco.json", tmp_path)
    assert (first.id, first.image_path.name, first.expression) == (7, "000000000042.jpg", "left dog")
    assert (first.box, first.width, first.height) == ((0.0, 0.0, 30.0, 50.0), 30, 50)
    assert (second.id, second.expression) == (1, "right dog")  # no id: the record's index


def _set(field, value):
    return lambda r: r.__setitem__(field, value)


def _drop(*fields):
    return lambda r: [r.pop(f) for f in fields]


@pytest.mark.parametrize(
    "change, error, words",
    [
        (_drop("bbox"), ValueError, ["missing field 'bbox'"]),
        (_set("bbox", [1, float("nan"), 2, 2]), ValueError, ["'bbox' y is not finite"]),
        (_set("bbox", [1, 1, -2, 2]), ValueError, ["'bbox'", "negative"]),
        (_set("bbox", [1, 1, 2]), ValueError, ["'bbox' must be 4 numbers"]),
        (_set("bbox", [30, 2, 15, 5]), ValueError, ["'bbox'", "outside the 40x24 image"]),
        (_set("caption", "  \n "), ValueError, ["'caption' is an empty expression"]),
        (_drop("caption"), ValueError, ["missing field 'caption'"]),
        (lambda r: (r.pop("caption"), r.update(sentences=[{"raw": "x"}])), ValueError, ["'sentences' item 0"]),
        (_set("file_name", "gone.png"), FileNotFoundError, ["'file_name'", "gone.png"]),
        (_drop("file_name"), ValueError, ["missing field 'file_name'"]),
        (_set("width", 0), ValueError, ["'width' must be a positive integer"]),
        (_set("id", "first"), ValueError, ["id 'first' is also the id of record 0"]),
    ],
)
def test_each_bad_record_is_named_with_its_field(tmp_path, change, error, words):
    _write_image(tmp_path, "im.png", (40, 24))
    good = {"id": "first", "file_name": "im.png", "caption": "red square", "bbox": [2, 3, 10, 5]}
    bad = {**good, "id": "second", "width": 40, "height": 24}
    change(bad)
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"annotations": [good, bad]}))
    with pytest.raises(error) as info:
        load_referring_expressions(path, tmp_path)
    message = str(info.value)
    assert str(path) in message and "record 1" in message
    for word in words:
        assert word in message
    if bad.get("id") == "second":
        assert "(id 'second')" in message


def test_a_file_of_the_wrong_shape_is_refused(tmp_path):
    path = tmp_path / "refs.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="under 'annotations'"):
        load_referring_expressions(path, tmp_path)
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_referring_expressions(path, tmp_path)


SIZES = [(40, 24), (24, 40), (32, 32)]
EXPRESSIONS = ["red square", "blue circle on the left; big", "green triangle"]


@pytest.fixture
def refs(tmp_path):
    records = []
    for i, (size, expression) in enumerate(zip(SIZES, EXPRESSIONS)):
        _write_image(tmp_path, f"im{i}.png", size, seed=i)
        records.append({"id": f"r{i}", "file_name": f"im{i}.png", "caption": expression, "bbox": [2, 3, 10 + i, 12]})
    (tmp_path / "ref-l4-val.json").write_text(json.dumps({"annotations": records}))
    return load_referring_expressions(tmp_path / "ref-l4-val.json", tmp_path)


def test_tiny_model_end_to_end_is_independent_of_the_batch_size(tiny_checkpoint, refs):
    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    randomize_(model)  # answers that differ per image, so batching has something to mix up
    result = evaluate_refexp(model, tokenizer, refs, batch_size=3, progress=False)
    assert result == evaluate_refexp(model, tokenizer, refs, batch_size=1, progress=False)
    assert len({item["answer"] for item in result["per_item"]}) == 3
    assert result["count"] == 3
    for key in ("acc50", "acc75", "acc90", "macc", "miou"):
        assert 0 <= result[key] <= 1
    assert [item["id"] for item in result["per_item"]] == ["r0", "r1", "r2"]
    for item, ref in zip(result["per_item"], refs):
        assert item["iou"] == (0.0 if item["box"] is None else box_iou(item["box"], ref.box))
    assert result["not_found"] == sum(item["box"] is None for item in result["per_item"])


def test_boxes_on_the_letterboxed_square_map_back_to_the_target(tiny_checkpoint, refs, monkeypatch):
    """The box path, which the random tiny model never reaches: a grounder that answers each expression's target
    box on the letterboxed square (and nothing for the last) must score IoU 1 where it answered."""
    model, tokenizer = load_model(tiny_checkpoint, device="cpu")
    answers = {}
    for ref in refs[:2]:
        _, (left, top, side) = letterbox(Image.new("RGB", (ref.width, ref.height)))
        x1, y1, x2, y2 = ref.box
        answers[ref.expression.replace(";", ",")] = (
            (x1 + left) / side,
            (y1 + top) / side,
            (x2 + left) / side,
            (y2 + top) / side,
        )
    calls = []

    class AnsweringGrounder:
        def __init__(self, model, prompts, batch_size):
            pass

        def __call__(self, codes, phrases):
            calls.append((codes, phrases))
            return [
                GroundingResult(Layout([Entity(p, answers[p]) for p in query if p in answers])) for query in phrases
            ]

    monkeypatch.setattr(refexp, "Grounder", AnsweringGrounder)
    result = evaluate_refexp(model, tokenizer, refs, batch_size=2, progress=False)
    assert [item["iou"] for item in result["per_item"]] == pytest.approx([1.0, 1.0, 0.0], abs=1e-9)
    assert result["per_item"][1]["box"] == pytest.approx(list(refs[1].box), abs=1e-9)
    assert result["per_item"][2]["box"] is None
    assert (result["acc50"], result["acc90"], result["not_found"]) == (2 / 3, 2 / 3, 1)
    assert math.isclose(result["miou"], 2 / 3)
    # One phrase per query, its ";" kept from splitting it in two; the codes are those of the padded squares.
    assert [p for _, phrases in calls for p in phrases] == [
        ["red square"],
        ["blue circle on the left, big"],
        ["green triangle"],
    ]
    vq = JanusVQTokenizer.from_model(model, show_progress=False)
    squares = [letterbox(Image.open(ref.image_path).convert("RGB"))[0] for ref in refs]
    codes = np.concatenate([c.numpy() for c, _ in calls])
    assert (codes == vq.encode(squares).numpy()).all()
    assert not (codes[1] == vq.encode([Image.open(refs[1].image_path).convert("RGB")]).numpy()[0]).all()
