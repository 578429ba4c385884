import json

import datasets
import pytest
import torch
from PIL import Image

from echogen_rl.data import coco as coco_module
from echogen_rl.data import codes, common, layoutsam, sources
from echogen_rl.data.coco import load_coco
from echogen_rl.data.codes import encode_image_codes
from echogen_rl.data.common import BadSampleWarning, FilterStats
from echogen_rl.data.layoutsam import load_layoutsam
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.data.sources import EVAL_SEED_OFFSET, LayoutDataArguments, build_layout_datasets
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.image_tokenizers import PaletteTokenizer
from echogen_rl.models.palette import PALETTE

W, H = 40, 30


class CountingTokenizer(PaletteTokenizer):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        return super().encode(images)


def _png(path, color, size=(W, H)):
    Image.new("RGB", size, PALETTE[color]).save(path)


def _entities(dataset):
    return [Layout.from_json(text).entities for text in dataset["layout"]]


@pytest.fixture
def coco(tmp_path):
    """Six 40x30 images: 1 and 2 are fine, 3 has no caption, 4 only a crowd box, 5 is corrupted, 6 is missing."""
    names = {1: "one.png", 2: "two.png", 3: "three.png", 4: "four.png", 5: "broken.png", 6: "missing.png"}
    for image_id, color in ((1, 1), (2, 2), (3, 3), (4, 4)):
        _png(tmp_path / names[image_id], color)
    (tmp_path / "broken.png").write_bytes(b"these bytes are not an image")
    images = [{"id": i, "file_name": n, "width": W, "height": H} for i, n in names.items()]
    boxes = [
        (1, 1, [4, 3, 20, 15], 0),  # -> (0.1, 0.1, 0.6, 0.6)
        (1, 2, [0, 0, 39, 30], 0),
        (1, 3, [0, 0, 10, 10], 1),  # crowd
        (1, 1, [0, 0, 1, 1], 0),  # 1/1200 of the image: tiny
        (2, 1, [0, 0, 10, 10], 0),  # areas 100, 600, 400: a cap of 2 keeps the last two
        (2, 2, [0, 0, 30, 20], 0),
        (2, 4, [10, 10, 20, 20], 0),
        (4, 3, [0, 0, 20, 20], 1),
        (5, 2, [0, 0, 39, 30], 0),
        (6, 2, [0, 0, 39, 30], 0),
    ]
    annotations = [
        {"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd, "area": b[2] * b[3]}
        for k, (i, c, b, crowd) in enumerate(boxes)
    ]
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "person"}]
    categories.append({"id": 4, "name": "hot  dog"})
    texts = [(1, "  a cat and a dog \n"), (1, "second"), (2, " "), (2, "two animals"), (4, "a crowd")]
    texts += [(5, "broken"), (6, "missing")]
    captions = [{"id": k, "image_id": i, "caption": t} for k, (i, t) in enumerate(texts)]
    instances_file, captions_file = tmp_path / "instances.json", tmp_path / "captions.json"
    instances_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    captions_file.write_text(json.dumps({"images": images, "annotations": captions}))
    return {"instances_file": instances_file, "captions_file": captions_file, "image_dir": tmp_path}


def _coco_args(coco, tmp_path, **kwargs):
    return LayoutDataArguments(
        dataset="coco",
        coco_instances_file=str(coco["instances_file"]),
        coco_captions_file=str(coco["captions_file"]),
        coco_image_dir=str(coco["image_dir"]),
        cache_dir=str(tmp_path / "cache"),
        **kwargs,
    )


def test_coco_boxes_crowd_tiny_boxes_and_cap(coco, tmp_path):
    dataset, stats = load_coco(**coco, cache_dir=tmp_path / "cache")
    assert dataset.column_names == ["caption", "layout", "image_path"]
    assert dataset["caption"] == ["a cat and a dog", "two animals", "broken", "missing"]
    assert dataset["image_path"][0] == str(tmp_path / "one.png")
    entities = _entities(dataset)
    assert entities[0] == [Entity("cat", (0.1, 0.1, 0.6, 0.6)), Entity("dog", (0.0, 0.0, 0.975, 1.0))]
    assert [e.phrase for e in entities[1]] == ["cat", "dog", "hot dog"]
    assert stats == FilterStats(rows_in=5, rows_kept=4, tiny_boxes_dropped=1, empty_layouts_dropped=1)

    capped, stats = load_coco(**coco, max_entities=2, cache_dir=tmp_path / "cache")
    assert _entities(capped)[1] == [
        Entity("dog", (0.0, 0.0, 0.75, 2 / 3)),
        Entity("hot dog", (0.25, 1 / 3, 0.75, 1.0)),
    ]
    assert stats.entities_capped == 1


def _layoutsam_rows():
    sized = {"image_path": "a.png", "width": W, "height": H}
    return [
        {  # stringified lists (Python literals), size given
            **sized,
            "global_caption": "a cat",
            "bbox_list": "[[4, 3, 24, 18], [0, 0, 40, 30]]",
            "detail_region_caption_list": "['a small cat', 'the whole  scene']",
        },
        {  # real lists, short region captions, size read from the 80x60 image
            "image_path": "b.png",
            "global_caption": "a dog",
            "bbox_list": [[8, 6, 48, 36]],
            "region_caption_list": ["a dog"],
        },
        {  # metadata as JSON text
            **sized,
            "global_caption": "a bird",
            "metadata": json.dumps({"bbox_info": [{"bbox": [0, 15, 20, 30], "description": "a bird"}]}),
        },
        {  # metadata as an object, size read from the image
            "image_path": "a.png",
            "global_caption": "a kite",
            "metadata": {"bbox_info": [{"bbox": [20, 0, 40, 15], "description": "a kite"}]},
        },
        {
            **sized,
            "global_caption": "x",
            "bbox_list": "[[0, 0, 9, 9], [1, 1, 5, 5]]",
            "region_caption_list": "['one']",
        },
        {**sized, "global_caption": "x", "bbox_list": "[[0, 0, 9", "region_caption_list": "['one']"},
        {**sized, "global_caption": "x", "bbox_list": [[0, 0, 9, 9]], "region_caption_list": ["<ref>"]},
        # no size, and no image to read it from
        {"image_path": "nope.png", "global_caption": "x", "bbox_list": [[0, 0, 9, 9]], "region_caption_list": ["one"]},
    ]


@pytest.fixture(params=["jsonl", "json"])
def layoutsam_file(request, tmp_path):
    _png(tmp_path / "a.png", 3)
    _png(tmp_path / "b.png", 4, size=(80, 60))
    path = tmp_path / f"layoutsam.{request.param}"
    rows = _layoutsam_rows()
    path.write_text("\n".join(map(json.dumps, rows)) if request.param == "jsonl" else json.dumps(rows))
    return path


def test_layoutsam_both_forms_and_bad_rows(layoutsam_file, tmp_path):
    with pytest.warns(BadSampleWarning) as record:
        dataset, stats = load_layoutsam(layoutsam_file, image_dir=tmp_path, cache_dir=tmp_path / "cache")
    messages = [str(w.message) for w in record]
    assert len(messages) == 4
    assert any("row 7 (" in m and "nope.png" in m for m in messages), messages
    for index, reason in ((4, "has 1 items but bbox_list has 2"), (5, "cannot be parsed"), (6, "tag <ref>")):
        assert any(f"row {index}:" in m and reason in m for m in messages), (index, messages)
    assert dataset["caption"] == ["a cat", "a dog", "a bird", "a kite"]
    assert dataset["image_path"] == [str(tmp_path / n) for n in ("a.png", "b.png", "a.png", "a.png")]
    assert _entities(dataset) == [
        [Entity("a small cat", (0.1, 0.1, 0.6, 0.6)), Entity("the whole scene", (0.0, 0.0, 1.0, 1.0))],
        [Entity("a dog", (0.1, 0.1, 0.6, 0.6))],
        [Entity("a bird", (0.0, 0.5, 0.5, 1.0))],
        [Entity("a kite", (0.5, 0.0, 1.0, 0.5))],
    ]
    assert stats == FilterStats(rows_in=8, rows_kept=4, bad_layouts=3, bad_images=1)
    with pytest.raises(ValueError, match="row 4:"):
        load_layoutsam(layoutsam_file, image_dir=tmp_path, on_bad_sample="raise", cache_dir=tmp_path / "cache")


def test_layoutsam_saved_dataset_with_embedded_images(tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "global_caption": datasets.Value("string"),
            "bbox_list": datasets.Value("string"),
            "region_captions": datasets.Value("string"),
        }
    )
    rows = {
        "image": [Image.new("RGB", (W, H), PALETTE[5])],
        "global_caption": ["a purple field"],
        "bbox_list": ["[[0, 0, 20, 15]]"],
        "region_captions": ['["a field"]'],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    dataset, stats = load_layoutsam(tmp_path / "saved", cache_dir=tmp_path / "cache")
    assert "image_path" not in dataset.column_names and stats.rows_kept == 1
    assert _entities(dataset) == [[Entity("a field", (0.0, 0.0, 0.5, 0.5))]]
    encoded, _ = encode_image_codes(dataset, PaletteTokenizer())
    assert encoded["image_codes"] == [[5] * 64]
    assert encoded[0]["image"].size == (W, H)


def test_encode_skips_bad_images_and_caches_codes(coco, tmp_path):
    dataset, _ = load_coco(**coco, cache_dir=tmp_path / "cache")
    tokenizer = CountingTokenizer()
    with pytest.warns(BadSampleWarning) as record:
        encoded, stats = encode_image_codes(dataset, tokenizer, batch_size=4, cache_key="palette-8")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "broken.png" in messages[0] and "missing.png" in messages[1]
    assert stats == FilterStats(rows_in=4, rows_kept=2, bad_images=2)
    assert encoded["caption"] == ["a cat and a dog", "two animals"]
    assert encoded["image_codes"] == [[1] * 64, [2] * 64]
    assert tokenizer.calls == 1

    # Same rows loaded again, same key: read from the cache, with the same warnings and counts.
    dataset, _ = load_coco(**coco, cache_dir=tmp_path / "cache")
    again = CountingTokenizer()
    with pytest.warns(BadSampleWarning) as record:
        cached, cached_stats = encode_image_codes(dataset, again, batch_size=4, cache_key="palette-8")
    assert again.calls == 0
    assert len(record) == 2 and cached_stats == stats
    assert cached["image_codes"] == encoded["image_codes"]

    other = CountingTokenizer()
    with pytest.warns(BadSampleWarning):
        encode_image_codes(dataset, other, batch_size=4, cache_key="another tokenizer")
    assert other.calls == 1


@pytest.mark.parametrize("cache_key", [None, "palette-8"])
def test_encode_raises_on_bad_images(coco, tmp_path, cache_key):
    dataset, _ = load_coco(**coco, cache_dir=tmp_path / "cache")
    if cache_key is not None:  # a cached result holds the bad rows: raising must not depend on a cache miss
        with pytest.warns(BadSampleWarning):
            encode_image_codes(dataset, PaletteTokenizer(), cache_key=cache_key)
    with pytest.raises(ValueError, match="broken.png"):
        encode_image_codes(dataset, PaletteTokenizer(), on_bad_sample="raise", cache_key=cache_key)
    with pytest.raises(ValueError, match="missing.png"):
        encode_image_codes(dataset.select([3]), PaletteTokenizer(), on_bad_sample="raise", cache_key=cache_key)


def test_build_coco_splits_eval_off_the_end(coco, tmp_path):
    args = _coco_args(coco, tmp_path, num_eval_samples=2, num_train_samples=1)
    with pytest.warns(BadSampleWarning):
        train, eval_dataset, stats = build_layout_datasets(args, PaletteTokenizer())
    assert train["caption"] == ["a cat and a dog"]  # "two animals" is beyond num_train_samples
    assert eval_dataset is None  # both eval rows (images 5 and 6) are unreadable
    assert stats == FilterStats(
        rows_in=5, rows_kept=1, tiny_boxes_dropped=1, empty_layouts_dropped=1, bad_images=2, rows_beyond_limit=1
    )


def test_build_coco_with_eval_files(coco, tmp_path):
    eval_files = {f"coco_eval_{k}": str(v) for k, v in coco.items()}
    args = _coco_args(coco, tmp_path, num_eval_samples=1, **eval_files)
    with pytest.warns(BadSampleWarning):
        train, eval_dataset, stats = build_layout_datasets(args, PaletteTokenizer())
    assert train["caption"] == ["a cat and a dog", "two animals"]
    assert eval_dataset["caption"] == ["a cat and a dog"] and eval_dataset["image_codes"] == [[1] * 64]
    assert (stats.rows_in, stats.rows_kept, stats.rows_beyond_limit, stats.bad_images) == (10, 3, 3, 2)


def test_build_raises_on_empty_train_before_encoding(coco, tmp_path):
    tokenizer = CountingTokenizer()
    with pytest.raises(ValueError, match=r"train set is empty after filtering.*kept 0 of 5 rows"):
        build_layout_datasets(_coco_args(coco, tmp_path, min_box_area=0.99), tokenizer)
    assert tokenizer.calls == 0


def test_build_shapes_splits_are_disjoint():
    args = LayoutDataArguments(num_train_samples=32, num_eval_samples=16, dataset_seed=3)
    train, eval_dataset, stats = build_layout_datasets(args)
    assert (len(train), len(eval_dataset)) == (32, 16) and stats.rows_kept == 48
    assert {"caption", "layout", "image_codes"} <= set(train.column_names)
    assert eval_dataset["layout"] == build_shapes_dataset(16, 3 + EVAL_SEED_OFFSET)["layout"]
    train_rows = {(t, tuple(c)) for t, c in zip(train["layout"], train["image_codes"])}
    assert not train_rows & {(t, tuple(c)) for t, c in zip(eval_dataset["layout"], eval_dataset["image_codes"])}
    assert build_layout_datasets(LayoutDataArguments(num_train_samples=4, num_eval_samples=0))[1] is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("dataset", "imagenet"),
        ("num_train_samples", 0),
        ("num_train_samples", None),  # shapes needs a count
        ("num_eval_samples", -1),
        ("dataset_seed", -1),
        ("shapes_grid_size", 0),
        ("shapes_max_shapes", 99),
        ("min_box_area", 1.0),
        ("min_box_area", float("nan")),
        ("max_entities", 0),
        ("on_bad_sample", "ignore"),
        ("vq_batch_size", 0),
    ],
)
def test_bad_arguments_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LayoutDataArguments(**{field: value})


def test_missing_paths_name_the_field():
    with pytest.raises(ValueError, match="missing coco_captions_file"):
        LayoutDataArguments(dataset="coco", coco_instances_file="i.json", coco_image_dir="images")
    with pytest.raises(ValueError, match="missing coco_eval_image_dir"):
        LayoutDataArguments(
            dataset="coco",
            coco_instances_file="i.json",
            coco_captions_file="c.json",
            coco_image_dir="images",
            coco_eval_instances_file="ei.json",
            coco_eval_captions_file="ec.json",
        )
    with pytest.raises(ValueError, match="missing layoutsam_file"):
        LayoutDataArguments(dataset="layoutsam")
    with pytest.raises(ValueError, match="image_tokenizer"):
        build_layout_datasets(LayoutDataArguments(dataset="layoutsam", layoutsam_file="rows.jsonl"))


def test_arguments_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(LayoutDataArguments).parse_args_into_dataclasses(
        [
            "--dataset",
            "layoutsam",
            "--layoutsam_file",
            "rows.jsonl",
            "--num_train_samples",
            "100",
            "--max_entities",
            "5",
        ]
    )
    assert (args.dataset, args.layoutsam_file, args.num_train_samples, args.max_entities) == (
        "layoutsam",
        "rows.jsonl",
        100,
        5,
    )


def test_filter_stats_merge_and_summary():
    total = FilterStats(rows_in=3, rows_kept=2, bad_images=1) + FilterStats(rows_in=5, rows_kept=1, bad_layouts=4)
    assert total == FilterStats(rows_in=8, rows_kept=3, bad_layouts=4, bad_images=1)
    assert "kept 3 of 8 rows" in total.summary() and "4 bad layouts" in total.summary()


def test_sources_reexports_the_loaders_and_shared_names():
    homes = {
        coco_module: ["load_coco"],
        layoutsam: ["load_layoutsam", "REGION_CAPTION_COLUMNS"],
        codes: ["encode_image_codes"],
        common: ["FilterStats", "BadSampleWarning", "BAD_SAMPLE_ACTIONS"],
    }
    for module, names in homes.items():
        for name in names:
            assert name in sources.__all__ and getattr(sources, name) is getattr(module, name), name


def test_layouts_alone_read_no_image(coco, tmp_path):
    """CycleRL's prompts are layouts: rows whose images are missing stay, and nothing is encoded."""
    from echogen_rl.data.random_layouts import add_prompt_column
    from echogen_rl.models.prompts import parse_prompt_text

    for image in coco["image_dir"].glob("*.png"):
        image.unlink()
    train, _, stats = build_layout_datasets(_coco_args(coco, tmp_path, num_eval_samples=0), encode=False)
    assert "image_codes" not in train.column_names and stats.bad_images == 0
    # The rows of the corrupted and the missing image stay too: their pixels are never needed.
    assert list(train["caption"]) == ["a cat and a dog", "two animals", "broken", "missing"]
    prompts = add_prompt_column(train)
    assert parse_prompt_text(prompts[0]["prompt"]).phrases == Layout.from_json(train[0]["layout"]).phrases
    with pytest.raises(ValueError, match="needs an image_tokenizer"):
        build_layout_datasets(_coco_args(coco, tmp_path, num_eval_samples=0))


def test_vq_code_cache_is_keyed_by_the_vq_weights(tiny_checkpoint):
    """Every stage's checkpoint carries the same frozen VQ model: their codes share one cache entry, and a
    checkpoint whose VQ model differs gets its own."""
    from transformers import JanusForConditionalGeneration

    from echogen_rl.models.image_tokenizers import JanusVQTokenizer

    pmtp = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    djo = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        djo.model.language_model.layers[0].mlp.up_proj.weight.add_(1.0)  # trained: another model, same VQ model
    key = JanusVQTokenizer.from_model(pmtp).cache_key
    assert JanusVQTokenizer.from_model(djo).cache_key == key
    with torch.no_grad():
        djo.model.vqmodel.quantize.embedding.weight[0, 0] += 1e-3
    assert JanusVQTokenizer(djo.model.vqmodel).cache_key != key


def test_vq_batch_size_reaches_the_tokenizer(tiny_checkpoint):
    from transformers import JanusForConditionalGeneration

    from echogen_rl.data.sources import vq_tokenizer_for

    model = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    args = LayoutDataArguments(dataset="layoutsam", layoutsam_file=__file__, vq_batch_size=7)
    assert vq_tokenizer_for(args, model).batch_size == 7
    assert vq_tokenizer_for(LayoutDataArguments(), model) is None  # shapes rows carry their codes


def test_the_splits_seeds_are_far_from_each_other_and_from_every_training_seed():
    from echogen_rl.data import splits

    scored = [splits.EVAL_HELD_OUT_SEED, splits.DEMO_HELD_OUT_SEED, splits.VALIDATION_SEED]
    scored += [splits.BENCHMARK_SAMPLES_SEED]
    scored += [s["held_out_seed"] for s in splits.SEED_SETS.values()]
    training = [s["first_seed"] + k for s in splits.SEED_SETS.values() for k in range(10)]
    training += [seed + splits.EVAL_SEED_OFFSET for seed in training]  # each run's own eval split
    for i, seed in enumerate(scored):
        assert all(abs(seed - other) > 1000 for other in scored[i + 1 :] + training), seed
    assert EVAL_SEED_OFFSET == splits.EVAL_SEED_OFFSET  # re-exported where the data arguments read it
