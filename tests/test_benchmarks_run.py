"""`echogen-rl eval --benchmark ...` end to end on the tiny checkpoint and the sample files in the official formats:
the COCO, LayoutSAM-Eval and referring-expression paths, resume, the report and the paper-table row."""

import ast
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from echogen_rl.eval.benchmarks import generation
from echogen_rl.eval.benchmarks.protocols import coco_items
from echogen_rl.eval.benchmarks.runner import run_benchmark
from echogen_rl.eval.benchmarks.samples import write_sample_benchmarks
from echogen_rl.layout import Entity, Layout

LIMIT, BATCH = 5, 2


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return write_sample_benchmarks(tmp_path_factory.mktemp("samples"), num_layouts=6)


def _coco(tiny_checkpoint, samples, out, **kwargs):
    args = {"detector": "grounder", "limit": LIMIT, "batch_size": BATCH, "palette": True, "device": "cpu"}
    files = {k: samples[k] for k in ("instances", "captions", "image_dir")}
    return run_benchmark("coco", str(tiny_checkpoint), out, **files, **(args | kwargs))


class ShiftedTruth:
    """A stand-in detector behind the real interface: each input box, shifted right by `shift` of the image, with
    falling confidence. Pixels are checked, not read: a box's IoU with its target is known in advance."""

    def __init__(self, shift=0.05):
        self.shift = shift

    def detect(self, images, items):
        assert all(image.size == images[0].size for image in images)
        out = []
        for item in items:
            boxes = [
                (min(x1 + self.shift, 1.0), y1, min(x2 + self.shift, 1.0), y2) for x1, y1, x2, y2 in item.layout.boxes
            ]
            out.append(
                (
                    Layout([Entity(p, b) for p, b in zip(item.layout.phrases, boxes)]),
                    [0.9 - 0.1 * k for k in range(len(boxes))],
                )
            )
        return out


def test_coco_runs_end_to_end_and_its_detections_file_scores_the_same(tiny_checkpoint, samples, tmp_path):
    from echogen_rl.eval.coco_ap import coco_ap

    detector = ShiftedTruth()
    report = _coco(tiny_checkpoint, samples, tmp_path / "run", detector=detector)
    names = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
    # The first LIMIT images in sorted id order, under COCO's file stems.
    assert names == [f"{1000 + 7 * i:012d}.png" for i in range(LIMIT)]
    coco = report["results"]["coco"]
    items, _ = coco_items(samples["instances"], samples["captions"], samples["image_dir"], LIMIT)
    found = detector.detect([Image.new("RGB", (8, 8))] * LIMIT, items)
    expected = coco_ap([d for d, _ in found], [i.layout for i in items], [s for _, s in found])
    assert report["items"] == LIMIT and coco == expected
    assert 0.0 < coco["ap"] < coco["ap50"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["results"] == report["results"]
    assert f"| {coco['ap'] * 100:.2f} |" in (tmp_path / "run" / "report.md").read_text()
    # The written detections, read back as an external detector's results, give the same AP: the two paths agree.
    detections = tmp_path / "run" / "detections.json"
    assert len(json.loads(detections.read_text())) == sum(len(i.layout) for i in items)
    again = _coco(tiny_checkpoint, samples, tmp_path / "again", detector=str(detections))
    for key in ("ap", "ap50", "ap75"):
        assert again["results"]["coco"][key] == pytest.approx(coco[key], abs=1e-9)


def test_a_stopped_run_resumes_to_the_images_and_report_of_an_unbroken_one(
    tiny_checkpoint, samples, tmp_path, monkeypatch
):
    unbroken = _coco(tiny_checkpoint, samples, tmp_path / "unbroken")
    saved, real_save = [], generation.save_image

    def stop_in_the_second_batch(image, path):
        if len(saved) == BATCH + 1:
            raise KeyboardInterrupt
        saved.append(path.name)
        real_save(image, path)

    monkeypatch.setattr(generation, "save_image", stop_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _coco(tiny_checkpoint, samples, tmp_path / "stopped")
    manifest = json.loads((tmp_path / "stopped" / "manifest.json").read_text())
    assert list(manifest["batches"]) == ["0"]  # the half-written batch is not listed as done
    monkeypatch.setattr(generation, "save_image", real_save)
    generated = []
    real_generate = generation.generate_images
    monkeypatch.setattr(
        generation, "generate_images", lambda *a, **k: generated.append(len(a[2])) or real_generate(*a, **k)
    )
    resumed = _coco(tiny_checkpoint, samples, tmp_path / "stopped")
    assert sum(generated) == LIMIT - BATCH  # batch 0 was not generated again
    for name in (p.name for p in (tmp_path / "unbroken" / "images").iterdir()):
        assert (tmp_path / "stopped" / "images" / name).read_bytes() == (
            tmp_path / "unbroken" / "images" / name
        ).read_bytes()
    assert resumed["results"] == unbroken["results"]


def test_a_run_folder_refuses_other_settings_and_overwrite_removes_only_its_files(tiny_checkpoint, samples, tmp_path):
    _coco(tiny_checkpoint, samples, tmp_path / "run", limit=2)
    with pytest.raises(ValueError, match="seed=0, not 3"):
        _coco(tiny_checkpoint, samples, tmp_path / "run", limit=2, seed=3)
    # Another model (or the same one decoded otherwise) never adds its images to this run's.
    other_model = tmp_path / "other-model"
    other_model.symlink_to(tiny_checkpoint)
    with pytest.raises(ValueError, match="model="):
        run_benchmark(
            "coco",
            str(other_model),
            tmp_path / "run",
            **{k: samples[k] for k in ("instances", "captions", "image_dir")},
            detector="grounder",
            limit=2,
            batch_size=BATCH,
            palette=True,
            device="cpu",
        )
    with pytest.raises(ValueError, match="palette=True, not False"):
        _coco(tiny_checkpoint, samples, tmp_path / "run", limit=2, palette=False)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _coco(tiny_checkpoint, samples, tmp_path / "run", limit=2, seed=3, overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["settings"]["seed"] == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="holds no run to resume"):
        _coco(tiny_checkpoint, samples, tmp_path / "other")


class ScriptedJudge:
    """Says yes to every presence question and to color; no to texture; an unparseable answer to shape."""

    def ask(self, image, question):
        if "present" in question:
            return "Yes"
        return {"color": "yes.", "texture": "No"}.get(
            next(a for a in ("color", "texture", "shape") if a in question), "Maybe"
        )


class MeanColor(torch.nn.Module):
    """A small FID feature extractor: per-channel means and standard deviations of the pixels."""

    num_features = 6

    def forward(self, images):
        x = images.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_layoutsam_runs_end_to_end_with_a_judge_and_fid(tiny_checkpoint, samples, tmp_path):
    from echogen_rl.eval.benchmarks.fid import compute_fid

    rows = samples["rows"]
    report = run_benchmark(
        "layoutsam",
        str(tiny_checkpoint),
        tmp_path / "run",
        rows=rows,
        image_dir=rows.parent,
        judge=ScriptedJudge(),
        fid_extractor=MeanColor(),
        fid_resolution=64,
        limit=LIMIT,
        batch_size=BATCH,
        palette=True,
        device="cpu",
    )
    lines = [json.loads(line) for line in rows.read_text().splitlines()[:LIMIT]]
    boxes = sum(len(ast.literal_eval(row["region_caption_list"])) for row in lines)
    scores = report["results"]["layoutsam"]
    assert scores["boxes"] == boxes
    assert (scores["spatial"], scores["color"], scores["texture"], scores["shape"]) == (100.0, 100.0, 0.0, 0.0)
    assert scores["answers"]["shape"] == {"yes": 0, "no": 0, "neither": boxes}
    names = [row["file_name"] for row in lines]
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == sorted(names)
    real = [rows.parent / row["image_path"] for row in lines]
    direct = compute_fid([tmp_path / "run" / "images" / n for n in names], real, MeanColor(), 64, progress=False)
    assert report["results"]["fid"]["fid"] == pytest.approx(direct["fid"], rel=1e-12)
    assert "| 100.00 | 100.00 | 0.00 | 0.00 |" in report["table_row"]


def test_refexp_runs_end_to_end_through_the_command(tiny_checkpoint, samples, tmp_path, capsys):
    from echogen_rl.cli import main

    out = tmp_path / "run"
    argv = ["eval", "--benchmark", "refexp", "--model", str(tiny_checkpoint), "--refs", str(samples["refs"])]
    main(
        argv + ["--image-dir", str(samples["image_dir"]), "--output-dir", str(out), "--limit", "4", "--device", "cpu"]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 4 and report["results"]["refexp"]["count"] == 4
    assert len(json.loads((out / "predictions.json").read_text())) == 4
    assert report["provenance"]["hardware"]
    assert report["table_row"] in capsys.readouterr().out


@pytest.mark.parametrize(
    ("benchmark", "missing"),
    [("coco", "--instances"), ("layoutsam", "--rows"), ("refexp", "--refs")],
)
def test_a_benchmark_without_its_files_names_the_flag(benchmark, missing, tmp_path):
    with pytest.raises(ValueError, match=f"--benchmark {benchmark} needs {missing}"):
        run_benchmark(benchmark, "no-such-model-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_paper_table_scales_and_merges_runs_of_one_model():
    from echogen_rl.eval.benchmarks.report import paper_table

    coco = {"model": "/ckpt/janus", "results": {"coco": {"ap": 0.54612, "ap50": 0.7, "ap75": None}}}
    sam = {
        "model": "/ckpt/janus",
        "results": {"layoutsam": {"spatial": 96.321, "color": 84.97}, "fid": {"fid": 20.124}},
    }
    ref = {
        "model": "/ckpt/janus",
        "adapter": "out/lora",
        "results": {"refexp": {"acc50": 0.5, "acc75": 0.25, "macc": 0.3}},
    }
    lines = paper_table([coco, sam, ref]).splitlines()
    assert lines[2] == "| janus | 54.61 | 70.00 | – | 96.32 | 84.97 | – | – | 20.12 | – | – | – |"
    assert lines[3] == "| janus + lora | – | – | – | – | – | – | – | – | 50.00 | 25.00 | 30.00 |"


def test_yolo_results_become_layouts_and_a_missing_weights_file_is_named(tmp_path):
    from echogen_rl.eval.benchmarks.detectors import YoloDetector, yolo_layout

    boxes = SimpleNamespace(
        xyxyn=torch.tensor([[0.1, 0.2, 0.5, 1.02], [0.0, 0.0, 0.3, 0.3]]),
        cls=torch.tensor([1.0, 0.0]),
        conf=torch.tensor([0.9, 0.25]),
    )
    layout, scores = yolo_layout(SimpleNamespace(boxes=boxes, names={0: "person", 1: "dining  table"}))
    assert layout.phrases == ["dining table", "person"]
    assert layout.entities[0].box == pytest.approx((0.1, 0.2, 0.5, 1.0))  # clipped to the image
    assert scores == pytest.approx([0.9, 0.25])
    with pytest.raises(FileNotFoundError, match="yolo:.*no such weights file"):
        YoloDetector(tmp_path / "yolov8x.pt")
