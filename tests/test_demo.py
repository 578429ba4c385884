import json
import math

import pytest

from echogen_rl.cli import main

STAGES = ("untrained", "pmtp", "djo", "cyclerl", "separate")
REQUIRED = ("ap", "ap50", "spatial", "color", "tolerant_l2i", "cycle_miou", "cycle_miou_ref", "grounding_acc50")


def _check_report(out):
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == set(STAGES)
    for stage, metrics in report["stages"].items():
        for key in REQUIRED:
            value = metrics[key]
            assert value is None or math.isfinite(value), (stage, key)
        assert metrics["ap"] is not None and metrics["cycle_miou"] is not None, stage
        assert metrics["tolerant_l2i"] is not None and metrics["cycle_miou_ref"] is not None, stage
    for stage in ("pmtp", "djo", "cyclerl", "separate"):
        assert (out / "pictures" / f"{stage}.png").stat().st_size > 0
    return report


def test_quick_demo_runs_every_stage_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--quick"]) == 0
    report = _check_report(out)
    assert report["budget"]["pmtp"]["max_steps"] == 4
    assert report["configs"]["djo"] == "recipes/configs/djo/shapes_tiny.yaml"  # repository-relative, no machine path
    assert "stage" in capsys.readouterr().out  # the printed table
    assert main(["demo", "--output-dir", str(out), "--quick"]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_learns_on_the_shapes_world(tmp_path):
    report = _check_report(tmp_path / "demo") if main(["demo", "--output-dir", str(tmp_path / "demo")]) == 0 else None
    stages = report["stages"]
    assert stages["pmtp"]["grounding_acc50"] > stages["untrained"]["grounding_acc50"]
    assert stages["pmtp"]["color"] > stages["untrained"]["color"]
