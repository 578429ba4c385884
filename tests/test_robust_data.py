"""Bad records in COCO and LayoutSAM files: each is skipped with its file, record and field named and counted under
its reason, or raises as `on_bad_sample` says; a non-finite number is never clipped into a box."""

import copy
import json
import math
import random
import warnings

import pytest

from echogen_rl.data.coco import load_coco
from echogen_rl.data.common import BadSampleWarning, FilterStats
from echogen_rl.data.layoutsam import load_layoutsam
from echogen_rl.layout import LayoutError, boxes_from_coco_xywh, boxes_from_pixel_xyxy

W, H = 40, 30
NUM_IMAGES = 12


def _valid_coco() -> tuple[dict, dict]:
    """Instances and captions of 12 captioned 40x30 images with two annotations each."""
    images = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in range(1, NUM_IMAGES + 1)]
    annotations = []
    for image in images:
        for j, box in enumerate(([2, 3, 10, 12], [15, 5, 20, 20])):
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image["id"], "category_id": 1 + j, "bbox": box, "iscrowd": 0}
            )
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    captions = [{"id": i, "image_id": i, "caption": f"picture {i}"} for i in range(1, NUM_IMAGES + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}, {"annotations": captions}


def _load(tmp_path, instances, captions, **kwargs):
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    files = dict(instances_file=tmp_path / "instances.json", captions_file=tmp_path / "captions.json")
    return load_coco(**files, image_dir=tmp_path, cache_dir=tmp_path / "cache", **kwargs)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda d: d["annotations"][2].update(category_id=99), "annotation 3 of image 2: category_id 99 is not in"),
        (lambda d: d["annotations"][2].pop("bbox"), "annotation 3 of image 2: field 'bbox' is missing"),
        (lambda d: d["images"][1].pop("width"), "image 2: field 'width' is missing"),
        (lambda d: d["annotations"][2].update(bbox=["2", "3", "10", "12"]), "field 'bbox' box coordinate 0 must be a"),
        (lambda d: d["annotations"][2].update(bbox=[2, math.nan, 10, 12]), "box coordinate 1 is nan, not a finite"),
        (lambda d: d["annotations"][2].update(bbox=[2, 3, -10, 12]), "box size must not be negative"),
        (lambda d: d["images"][1].update(height=math.inf), "image 2: field 'height' must be a positive finite"),
    ],
)
def test_a_bad_coco_record_is_named_and_counted_or_raises(tmp_path, corrupt, message):
    instances, captions = _valid_coco()
    corrupt(instances)
    with pytest.warns(BadSampleWarning, match="instances.json") as record:
        dataset, stats = _load(tmp_path, instances, captions)
    assert any(message in str(w.message) for w in record), [str(w.message) for w in record]
    assert stats == FilterStats(rows_in=NUM_IMAGES, rows_kept=NUM_IMAGES - 1, bad_layouts=1)
    assert "picture 2" not in dataset["caption"]  # the whole image: a layout with an object left out is wrong
    with pytest.raises(ValueError, match=message.split(":")[0]):
        _load(tmp_path, instances, captions, on_bad_sample="raise")


def test_records_that_belong_to_no_image_are_bad_records(tmp_path):
    instances, captions = _valid_coco()
    instances["annotations"][0]["image_id"] = "1"
    instances["categories"].append({"id": 3})
    instances["images"].append({"file_name": "x.png", "width": W, "height": H})
    captions["annotations"].append({"id": 99, "image_id": 1, "caption": 7})
    with pytest.warns(BadSampleWarning) as record:
        _, stats = _load(tmp_path, instances, captions)
    messages = "\n".join(str(w.message) for w in record)
    assert "annotation 1: field 'image_id' must be an integer, got '1'" in messages
    assert "category 3: field 'name' is missing" in messages
    assert "image #12 (no usable id)" not in messages and "image #12: field 'id' is missing" in messages
    assert "captions.json: caption 99: field 'caption' must be a string, got 7" in messages
    assert stats.bad_records == 4 and stats.bad_layouts == 0


def test_unreadable_coco_files_raise_naming_the_file(tmp_path):
    (tmp_path / "instances.json").write_text('{"images": [')
    (tmp_path / "captions.json").write_text("{}")
    files = dict(instances_file=tmp_path / "instances.json", captions_file=tmp_path / "captions.json")
    with pytest.raises(ValueError, match=r"instances.json: not valid JSON"):
        load_coco(**files, image_dir=tmp_path)
    (tmp_path / "instances.json").write_text('{"images": {}}')
    with pytest.raises(ValueError, match=r"instances.json: 'images' must be a list, got dict"):
        load_coco(**files, image_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.json: no such COCO file"):
        load_coco(tmp_path / "nothing.json", tmp_path / "captions.json", tmp_path)


def test_non_finite_numbers_are_never_clipped_into_a_box():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(LayoutError, match="not a finite number"):
            boxes_from_pixel_xyxy((0, 0, bad, 10), W, H)
        with pytest.raises(LayoutError, match="not a finite number"):
            boxes_from_coco_xywh((bad, 0, 5, 5), W, H)
        with pytest.raises(LayoutError, match="positive finite number"):
            boxes_from_pixel_xyxy((0, 0, 5, 5), bad, H)
    with pytest.raises(LayoutError, match="must be a number, got True"):
        boxes_from_pixel_xyxy((0, 0, True, 5), W, H)


# What a property test may do to a record: delete a field, change its type, a NaN or an infinity, a negative size.
def _corruptions():
    return [
        ("delete", lambda r, k: r.pop(k)),
        ("string", lambda r, k: r.__setitem__(k, str(r[k]))),
        ("nan", lambda r, k: r.__setitem__(k, math.nan if not isinstance(r[k], list) else [math.nan, *r[k][1:]])),
        ("inf", lambda r, k: r.__setitem__(k, math.inf if not isinstance(r[k], list) else [*r[k][:2], math.inf, 1])),
        ("negative", lambda r, k: r.__setitem__(k, -3 if not isinstance(r[k], list) else [*r[k][:2], -4, r[k][3]])),
    ]


@pytest.mark.parametrize("seed", range(20))
def test_random_corruption_of_a_coco_file_is_counted_record_by_record(tmp_path, seed):
    rng = random.Random(seed)
    instances, captions = _valid_coco()
    # At most one corruption per image, so that each corrupted record is one skip.
    corrupted = rng.sample(range(NUM_IMAGES), rng.randint(1, 6))
    expected = FilterStats(rows_in=NUM_IMAGES)
    for i in corrupted:
        kind, corrupt = rng.choice(_corruptions())
        if rng.random() < 0.5:  # the image record
            record, key = instances["images"][i], rng.choice(["width", "height"])
        else:  # one of its annotations
            record, key = instances["annotations"][2 * i + rng.randrange(2)], rng.choice(["bbox", "category_id"])
            if kind == "negative" and key == "category_id":
                key = "bbox"
        if kind == "nan" and key == "category_id":
            kind, corrupt = "string", _corruptions()[1][1]
        corrupt(record, key)
        expected.bad_layouts += 1
    expected.rows_kept = NUM_IMAGES - len(corrupted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset, stats = _load(tmp_path, copy.deepcopy(instances), captions)
    assert stats == expected, (seed, [str(w.message) for w in caught])
    assert len([w for w in caught if issubclass(w.category, BadSampleWarning)]) == len(corrupted)
    with pytest.raises(ValueError, match=r"instances.json: (image|annotation) \d+"):
        _load(tmp_path, instances, captions, on_bad_sample="raise")


def _layoutsam_row(i: int) -> dict:
    return {
        "global_caption": f"scene {i}",
        "bbox_list": [[2, 3, 20, 15], [5, 5, 30, 25]],
        "region_captions": [f"thing {i}", f"other {i}"],
        "width": W,
        "height": H,
        "image_path": f"{i}.png",
    }


@pytest.mark.parametrize("seed", range(20))
def test_random_corruption_of_layoutsam_rows_is_counted_row_by_row(tmp_path, seed):
    rng = random.Random(seed)
    rows = [_layoutsam_row(i) for i in range(NUM_IMAGES)]
    corrupted = rng.sample(range(NUM_IMAGES), rng.randint(1, 6))
    for i in corrupted:
        row = rows[i]
        kind = rng.choice(["delete", "string", "nan", "inf", "negative"])
        key = rng.choice(["global_caption", "bbox_list", "region_captions", "width"])
        if kind == "delete":
            row.pop(key)
            if key == "width":  # without a declared size the image is opened, and it does not exist
                row["image_path"] = "missing.png"
        elif kind == "string" and key in ("global_caption", "region_captions"):
            row[key] = 5
        elif kind == "string":
            row[key] = {"bbox_list": "[[1, 2", "width": "wide"}[key]
        elif key == "width":
            row["width"] = {"nan": math.nan, "inf": math.inf, "negative": -40}[kind]
        else:
            j = rng.randrange(2)
            row["bbox_list"][j] = {"nan": [math.nan, 3, 20, 15], "inf": [2, 3, math.inf, 15]}.get(kind, [20, 3, 2, 15])
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset, stats = load_layoutsam(path, image_dir=tmp_path, cache_dir=tmp_path / "cache")
    skipped = stats.bad_layouts + stats.bad_images
    assert skipped == len(corrupted) and stats.rows_kept == NUM_IMAGES - len(corrupted), (seed, stats, rows)
    assert len([w for w in caught if issubclass(w.category, BadSampleWarning)]) == len(corrupted)
    assert sorted(dataset["caption"]) == sorted(f"scene {i}" for i in range(NUM_IMAGES) if i not in corrupted)
    with pytest.raises(ValueError, match=r"LayoutSAM (row|\S+ row) \d+"):
        load_layoutsam(path, image_dir=tmp_path, on_bad_sample="raise", cache_dir=tmp_path / "cache")
