import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from echogen_rl.cli import main
from echogen_rl.data.shapes import ShapesConfig, build_shapes_dataset, codes_to_image, phrase_pool, render_codes
from echogen_rl.eval.coco_ap import COCO_IMAGE_SIZE, coco_ap
from echogen_rl.eval.coco_results import load_coco_results
from echogen_rl.eval.evaluation import format_table, write_report
from echogen_rl.eval.inference import evaluate_l2i
from echogen_rl.eval.metrics import color_accuracy, cycle_miou, grounding_accuracy, spatial_accuracy
from echogen_rl.layout import Entity, Layout

# Two boxes with IoU exactly 2/3: a 0.5-wide box and the same box moved right by a fifth of its width.
BOX = (0.1, 0.1, 0.6, 0.5)
SHIFTED = (0.2, 0.1, 0.7, 0.5)


def lay(*entities):
    return Layout([Entity(phrase, box) for phrase, box in entities])


def pixel_xywh(box, size):
    return [box[0] * size, box[1] * size, (box[2] - box[0]) * size, (box[3] - box[1]) * size]


def pycocotools_stats(targets, detections, scores):
    """COCOeval run directly, on COCO objects built here by hand."""
    s = COCO_IMAGE_SIZE
    names = sorted({e.phrase for t in targets for e in t.entities})
    cat = {n: k + 1 for k, n in enumerate(names)}

    anns = []
    for i, t in enumerate(targets, start=1):
        for e in t.entities:
            bb = pixel_xywh(e.box, s)
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": cat[e.phrase], "bbox": bb}
            anns.append(ann | {"area": bb[2] * bb[3], "iscrowd": 0})
    results = [
        {"image_id": i, "category_id": cat[e.phrase], "bbox": pixel_xywh(e.box, s), "score": sc}
        for i, (d, row) in enumerate(zip(detections, scores), start=1)
        for e, sc in zip(d.entities, row)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i, "width": s, "height": s} for i in range(1, len(targets) + 1)],
            "annotations": anns,
            "categories": [{"id": k, "name": n} for n, k in cat.items()],
        }
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:3]]


def test_coco_ap_agrees_with_pycocotools():
    targets = [
        lay(("red circle", BOX), ("blue square", (0.7, 0.6, 0.9, 0.9))),
        lay(("red circle", (0.0, 0.0, 0.3, 0.3))),
    ]
    detections = [
        lay(("red circle", SHIFTED), ("blue square", (0.7, 0.6, 0.9, 0.9)), ("red circle", (0.5, 0.5, 0.8, 0.8))),
        lay(("red circle", (0.02, 0.0, 0.3, 0.3)), ("blue square", (0.1, 0.1, 0.2, 0.2))),
    ]
    scores = [[0.9, 0.8, 0.95], [0.4, 0.7]]
    result = coco_ap(detections, targets, scores)
    assert [result["ap"], result["ap50"], result["ap75"]] == pycocotools_stats(targets, detections, scores)
    assert 0 < result["ap"] < result["ap50"] < 1
    # Ranking matters: the same false positive ranked below every true one hurts AP less.
    better = coco_ap(detections, targets, [[0.9, 0.8, 0.1], [0.4, 0.05]])
    assert better["ap50"] > result["ap50"]


def test_coco_ap_perfect_and_shifted():
    targets = [lay(("red circle", BOX), ("blue square", (0.7, 0.6, 0.9, 0.9))), lay(("green triangle", BOX))]
    # COCOeval averages 101 recall points, so a perfect 1.0 comes back up to a rounding error.
    assert coco_ap(targets, targets) == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "dropped_detections": 0})
    shifted = coco_ap([lay(("red circle", SHIFTED))], [lay(("red circle", BOX))])
    # IoU 2/3 passes the thresholds 0.50, 0.55, 0.60, 0.65 of the ten: AP 0.4, AP50 1, AP75 0.
    assert shifted["ap"] == pytest.approx(0.4)
    assert (shifted["ap50"], shifted["ap75"]) == pytest.approx((1.0, 0.0))
    assert [shifted["ap"], shifted["ap50"], shifted["ap75"]] == pycocotools_stats(
        [lay(("red circle", BOX))], [lay(("red circle", SHIFTED))], [[1.0]]
    )


def test_coco_ap_edge_cases():
    targets = [lay(("Red  Circle", BOX))]
    # Phrases compare like match_layouts does; unknown phrases are dropped and counted.
    result = coco_ap([lay(("red circle", BOX), ("red blob", BOX), ("cat", BOX))], targets)
    assert result == pytest.approx({"ap": 1.0, "ap50": 1.0, "ap75": 1.0, "dropped_detections": 2})
    assert coco_ap([Layout()], targets)["ap"] == 0.0
    assert coco_ap([lay(("red circle", BOX))], [Layout()])["ap"] is None
    with pytest.raises(ValueError, match="2 scores for 1"):
        coco_ap(targets, targets, [[1.0, 0.5]])


def test_spatial_accuracy():
    row = lay(
        ("red square", (0.0, 0.4, 0.2, 0.6)),
        ("blue square", (0.4, 0.4, 0.6, 0.6)),
        ("green square", (0.8, 0.4, 1.0, 0.6)),
    )
    assert spatial_accuracy([row], [row]) == 1.0
    # Red and blue trade places: (red, blue) fails; (red, green) and (blue, green) still hold.
    swapped = lay(
        ("red square", (0.4, 0.4, 0.6, 0.6)),
        ("blue square", (0.0, 0.4, 0.2, 0.6)),
        ("green square", (0.8, 0.4, 1.0, 0.6)),
    )
    assert spatial_accuracy([swapped], [row]) == pytest.approx(2 / 3)
    # A missing detection fails every relation it takes part in.
    assert spatial_accuracy([lay(*[(e.phrase, e.box) for e in row.entities[1:]])], [row]) == pytest.approx(1 / 3)
    # A diagonal pair is two checks (x and y); both pooled with the row's three.
    diagonal = lay(("red circle", (0.0, 0.0, 0.2, 0.2)), ("blue circle", (0.6, 0.6, 0.8, 0.8)))
    assert spatial_accuracy([swapped, diagonal], [row, diagonal]) == pytest.approx(4 / 5)
    assert spatial_accuracy([row], [lay(("red square", BOX))]) is None
    side_by_side = lay(("red square", (0.0, 0.0, 0.2, 0.2)), ("blue square", (0.02, 0.02, 0.22, 0.22)))
    assert spatial_accuracy([side_by_side], [side_by_side]) is None
    assert spatial_accuracy([side_by_side], [side_by_side], margin=0.0) == 1.0


def test_color_accuracy():
    config = ShapesConfig()
    drawn = lay(("red square", (0.0, 0.0, 0.25, 0.25)), ("blue rectangle", (0.5, 0.5, 1.0, 0.75)))
    codes = render_codes(drawn, config)
    assert color_accuracy([codes], [drawn], config) == 1.0
    assert color_accuracy([codes_to_image(codes, config)], [drawn], config) == 1.0  # images read back exactly
    misnamed = lay(("green square", (0.0, 0.0, 0.25, 0.25)), ("yellow rectangle", (0.5, 0.5, 1.0, 0.75)))
    assert color_accuracy([codes], [misnamed], config) == 0.0
    half = lay(("red square", (0.0, 0.0, 0.25, 0.25)), ("yellow rectangle", (0.5, 0.5, 1.0, 0.75)))
    assert color_accuracy([codes], [half], config) == 0.5
    # The majority of the cells decides: 3 green cells and 1 red in a red target's 2x2 box.
    grid = np.array(codes).reshape(8, 8)
    grid[0, 0] = grid[0, 1] = grid[1, 0] = 2
    assert color_accuracy([grid.ravel().tolist()], [lay(("red square", (0.0, 0.0, 0.25, 0.25)))], config) == 0.0
    assert color_accuracy([grid.ravel().tolist()], [lay(("green square", (0.0, 0.0, 0.25, 0.25)))], config) == 1.0
    # Background and out-of-palette codes do not vote; an empty box fails; colorless phrases are not scored.
    assert color_accuracy([[0] * 60 + [99] * 4], [lay(("red square", (0.75, 0.75, 1.0, 1.0)))], config) == 0.0
    assert color_accuracy([codes], [lay(("cat", BOX))], config) is None
    with pytest.raises(ValueError, match="64 codes"):
        color_accuracy([[0] * 10], [drawn], config)


def test_cycle_miou_and_grounding_accuracy():
    targets = [
        lay(("red circle", BOX), ("blue square", (0.7, 0.7, 0.9, 0.9))),
        lay(("green square", BOX), ("cat", (0.0, 0.0, 0.1, 0.1))),
    ]
    recovered = [
        lay(("red circle", BOX)),  # blue square missing: IoU 0
        lay(("green square", SHIFTED), ("cat", (0.0, 0.0, 0.1, 0.1))),  # IoU 2/3 and 1
    ]
    # Per image: (1 + 0) / 2 and (2/3 + 1) / 2; then their mean.
    assert cycle_miou(recovered, targets) == pytest.approx((0.5 + 5 / 6) / 2)
    result = grounding_accuracy(recovered, targets)
    # Pooled over the four target entities: IoUs 1, 0, 2/3, 1.
    assert result["acc50"] == 0.75 and result["acc75"] == 0.5
    assert result["miou"] == pytest.approx((1 + 0 + 2 / 3 + 1) / 4)
    assert cycle_miou([Layout()], [Layout()]) is None
    assert grounding_accuracy([], []) == {"acc50": None, "acc75": None, "miou": None}
    with pytest.raises(ValueError, match="1 predictions for 2 target"):
        grounding_accuracy(recovered[:1], targets)


def test_load_coco_results_round_trip(tmp_path):
    layouts = [lay(("person", (0.25, 0.5, 0.75, 1.0))), lay(("dog", (0.0, 0.0, 0.5, 0.5)), ("person", BOX))]
    sizes = [(64, 32), (100, 200)]
    categories = {1: "person", 18: "dog"}
    ids = {name: k for k, name in categories.items()}
    entries = [{"image_id": 777, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.3}]  # not evaluated: ignored
    for image_id, (layout, (w, h)) in zip((5, 9), zip(layouts, sizes)):
        for k, e in enumerate(layout.entities):
            x1, y1, x2, y2 = e.box
            bbox = [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h]
            entries.append({"image_id": image_id, "category_id": ids[e.phrase], "bbox": bbox, "score": 0.5 + k / 10})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(entries))
    loaded, scores = load_coco_results(path, [5, 9], categories, sizes)
    assert scores == [[0.5], [0.5, 0.6]]
    for got, want in zip(loaded, layouts):
        assert got.phrases == want.phrases
        assert np.allclose(got.boxes, want.boxes)
    assert coco_ap(loaded, layouts, scores)["ap"] == pytest.approx(1.0)
    normalized, _ = load_coco_results(path, [5], categories, normalized=True)
    assert normalized[0].boxes == [(1.0, 1.0, 1.0, 1.0)]  # pixel boxes read as normalized clip to the corner


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5]}, "score"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 1.0}, "bbox"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 1.0}, "bbox"),
        ({"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}, "category_id"),
        ({"image_id": "1", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}, "image_id"),
        ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": float("nan")}, "score"),
    ],
)
def test_load_coco_results_rejects_bad_entries(tmp_path, entry, field):
    path = tmp_path / "results.json"
    good = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}
    path.write_text(json.dumps([good, entry]))
    with pytest.raises(ValueError, match=f"entry 1: .*'{field}'"):
        load_coco_results(path, [1], {1: "person"}, [(10, 10)])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco_results(tmp_path / "missing.json", [1], {1: "person"}, [(10, 10)])


def test_report_and_table(tmp_path):
    report = {"detector": "oracle", "l2i": {"ap": 0.5, "color": None, "dropped_detections": 3}}
    path = write_report(report, tmp_path / "sub" / "eval.json")
    assert json.loads(path.read_text()) == report
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left behind
    table = format_table(report).splitlines()
    assert table == [
        "detector                oracle",
        "l2i.ap                  0.5000",
        "l2i.color               n/a",
        "l2i.dropped_detections  3",
    ]
    with pytest.raises(ValueError):
        write_report({"ap": float("nan")}, path)


def test_external_detector_results(tiny_model, tiny_tokenizer, tmp_path):
    """The InstanceDiffusion protocol: a detector's COCO results on the generated images, under their image ids
    (1, 2, ...) and the phrase-pool category ids, in pixels of the generated images."""
    config = ShapesConfig()
    layouts = [Layout.from_json(text) for text in build_shapes_dataset(3, seed=5, config=config)["layout"]]
    pool = {phrase: k for k, phrase in enumerate(phrase_pool(config), start=1)}
    size = config.image_size
    kwargs = dict(shapes_config=config, guidance_scale=1.0, seed=3)

    def write(detections):
        entries = [
            {"image_id": i, "category_id": pool[e.phrase], "bbox": pixel_xywh(e.box, size), "score": 1.0}
            for i, detected in enumerate(detections, start=1)
            for e in detected.entities
            if e.phrase in pool
        ]
        (tmp_path / "results.json").write_text(json.dumps(entries))
        return str(tmp_path / "results.json")

    # A detector that finds exactly the target boxes is perfect.
    perfect = evaluate_l2i(tiny_model, tiny_tokenizer, layouts, write(layouts), **kwargs)["metrics"]
    assert (perfect["ap"], perfect["spatial"]) == pytest.approx((1.0, 1.0))
    # The oracle's detections, saved as results, score as the oracle does (the same seed, the same images).
    oracle = evaluate_l2i(tiny_model, tiny_tokenizer, layouts, "oracle", **kwargs)
    external = evaluate_l2i(tiny_model, tiny_tokenizer, layouts, write(oracle["detections"]), **kwargs)
    assert torch.equal(external["codes"], oracle["codes"])
    for key in ("ap", "ap50", "ap75", "color", "cycle_miou"):
        assert external["metrics"][key] == pytest.approx(oracle["metrics"][key])


def test_eval_cli(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_checkpoint), "--num-layouts", "4", "--output-dir", str(out)]
    assert main(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["num_layouts"] == 4 and report["detector"] == "oracle"
    l2i_keys = {"ap", "ap50", "ap75", "dropped_detections", "spatial", "color", "cycle_miou"}
    assert set(report["l2i"]) == l2i_keys
    assert set(report["i2l"]) == {"acc50", "acc75", "miou", "parse_failure_rate", "problem_rate"}
    assert report["i2l"]["parse_failure_rate"] <= report["i2l"]["problem_rate"]
    for value in [*report["l2i"].values(), *report["i2l"].values()]:
        assert value is None or (math.isfinite(value) and 0 <= value)
    assert "l2i.cycle_miou" in capsys.readouterr().out
    with Image.open(out / "eval.png") as picture:
        assert picture.size[0] > 256
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(1, 5)]

    before = (out / "eval.json").read_bytes()
    assert main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "eval.json").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0
    assert (out / "eval.json").read_bytes() == before  # the same seed evaluates the same images
    for flag, missing in (("--adapter", tmp_path / "no-adapter"), ("--model", tmp_path / "no-model")):
        assert main([*args, "--overwrite", flag, str(missing)]) == 2
        assert str(missing) in capsys.readouterr().err


def test_eval_cli_applies_adapter(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import JanusForConditionalGeneration

    from echogen_rl.models.loading import DEFAULT_LORA_TARGETS

    model = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    # Random (not zero) LoRA weights, so that the adapter changes what the model generates.
    lora = LoraConfig(r=4, target_modules=DEFAULT_LORA_TARGETS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    args = ["eval", "--model", str(tiny_checkpoint), "--num-layouts", "2", "--detector", "grounder"]
    assert main([*args, "--output-dir", str(tmp_path / "base")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "tuned"), "--adapter", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "tuned" / "eval.json").read_text())["adapter"] == str(tmp_path / "adapter")
    images = [(tmp_path / run / "images" / "000001.png").read_bytes() for run in ("base", "tuned")]
    assert images[0] != images[1]


def test_spatial_does_not_let_a_misnamed_blob_stand_in():
    from echogen_rl.eval.metrics import spatial_accuracy
    from echogen_rl.layout import Entity, Layout

    target = Layout([Entity("red square", (0.0, 0.0, 0.2, 0.2)), Entity("blue circle", (0.6, 0.6, 0.8, 0.8))])
    misnamed = Layout([Entity("green blob", (0.0, 0.0, 0.2, 0.2)), Entity("blue circle", (0.6, 0.6, 0.8, 0.8))])
    assert spatial_accuracy([target], [target]) == 1.0
    assert spatial_accuracy([misnamed], [target]) == 0.0


def test_mask_iou_ranks_an_exact_drawing_above_a_filled_box_above_nothing():
    from echogen_rl.data.shapes import render_codes
    from echogen_rl.eval.metrics import mask_iou, mask_iou_per_image

    cfg = ShapesConfig()
    target = Layout([Entity("red circle", (0.0, 0.0, 0.5, 0.5)), Entity("blue triangle", (0.5, 0.5, 1.0, 1.0))])
    exact = render_codes(target, cfg)
    filled = render_codes(
        Layout([Entity("red square", (0.0, 0.0, 0.5, 0.5)), Entity("blue square", (0.5, 0.5, 1.0, 1.0))]), cfg
    )
    shifted = render_codes(Layout([Entity("red circle", (0.125, 0.0, 0.625, 0.5))]), cfg)
    empty = [0] * 64
    scores = mask_iou_per_image([exact, filled, shifted, empty], [target] * 4, cfg)
    assert scores[0] == 1.0
    # The 4 x 4 disk and the 4 x 4 triangle each fill 12 of their box's 16 cells.
    assert scores[1] == pytest.approx(12 / 16)
    # Shifted right by one cell, the blue triangle missing: the disk and its copy share 8 cells of 16 in all.
    assert scores[2] == pytest.approx((8 / 16 + 0.0) / 2)
    assert scores[3] == 0.0
    assert mask_iou([exact, empty], [target] * 2, cfg) == 0.5
    # Phrases outside the shapes world are not scored.
    assert mask_iou_per_image([exact], [Layout([Entity("a cat", (0, 0, 1, 1))])], cfg) == [None]
    with pytest.raises(ValueError, match="expected 64 codes"):
        mask_iou_per_image([[0] * 10], [target], cfg)


def test_resampled_ap_equals_pycocotools_on_any_multiset_of_images():
    from echogen_rl.eval.coco_ap import ResampledAP

    cfg = ShapesConfig()
    data = build_shapes_dataset(48, seed=11, config=cfg)
    targets = [Layout.from_json(t) for t in data["layout"]]
    rng = np.random.default_rng(0)
    detections = []
    for t in targets:  # kept, shifted by whole cells (IoUs at exact thresholds), renamed, dropped or duplicated
        entities = []
        for e in t.entities:
            roll = rng.uniform()
            dx = int(rng.integers(-2, 3)) / 8
            box = (max(0.0, e.box[0] + dx), e.box[1], min(1.0, e.box[2] + dx), e.box[3])
            if roll < 0.5:
                entities.append(Entity(e.phrase, box if box[2] > box[0] else e.box))
            elif roll < 0.7:
                entities.append(Entity(phrase_pool()[int(rng.integers(len(phrase_pool())))], e.box))
            elif roll < 0.85:
                entities += [Entity(e.phrase, e.box), Entity(e.phrase, e.box)]
        detections.append(Layout(entities))
    fast = ResampledAP(detections, targets)
    for images in (list(range(48)), rng.integers(0, 48, 48).tolist(), [3, 3, 3, 7], []):
        ref = coco_ap([detections[i] for i in images], [targets[i] for i in images])
        got = fast.ap(images)
        for key in ("ap", "ap50"):
            assert (got[key] is None and ref[key] is None) or got[key] == pytest.approx(ref[key], abs=1e-12), (
                images[:5],
                key,
            )
    assert 0.1 < fast.ap()["ap"] < 0.9  # a mix of hits and misses, not a trivial case
