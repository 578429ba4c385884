"""A benchmark run's report as a row of the paper's table, and the table of several runs."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

# (column, result section, key, scale): the paper reports AP and grounding accuracy in percent, LayoutSAM-Eval's
# scores are percentages already, FID is a distance.
COLUMNS = (
    ("COCO AP", "coco", "ap", 100.0),
    ("AP50", "coco", "ap50", 100.0),
    ("AP75", "coco", "ap75", 100.0),
    ("Spatial", "layoutsam", "spatial", 1.0),
    ("Color", "layoutsam", "color", 1.0),
    ("Texture", "layoutsam", "texture", 1.0),
    ("Shape", "layoutsam", "shape", 1.0),
    ("FID", "fid", "fid", 1.0),
    ("Ref Acc@0.5", "refexp", "acc50", 100.0),
    ("Ref Acc@0.75", "refexp", "acc75", 100.0),
    ("Ref mAcc", "refexp", "macc", 100.0),
)

# The published figures of the method, for the docs' comparison row.
PAPER = {"COCO AP": 54.61, "Spatial": 96.32, "Color": 84.97, "FID": 20.12}

MISSING = "–"


def _model_name(report: dict) -> str:
    name = Path(str(report.get("model", "?"))).name or str(report.get("model"))
    return f"{name} + {Path(str(report['adapter'])).name}" if report.get("adapter") else name


def table_cells(report: dict) -> dict[str, str]:
    """The paper-table cells a report fills, formatted with two decimals."""
    cells = {}
    for column, section, key, scale in COLUMNS:
        value = report.get("results", {}).get(section, {}).get(key)
        if value is not None:
            cells[column] = f"{value * scale:.2f}"
    return cells


def paper_table(reports: Sequence[dict]) -> str:
    """A Markdown table in the shape of the paper's, one row per model: the runs of one model (one report per
    benchmark) fill one row; a later report of the same benchmark replaces an earlier one's cells."""
    rows: dict[str, dict[str, str]] = {}
    for report in reports:
        rows.setdefault(_model_name(report), {}).update(table_cells(report))
    header = ["Model", *(c for c, *_ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|"]
    for model, cells in rows.items():
        lines.append("| " + " | ".join([model, *(cells.get(c, MISSING) for c, *_ in COLUMNS)]) + " |")
    return "\n".join(lines)


def read_reports(run_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """The `report.json` of each run folder (or a report file itself); errors name the folder."""
    reports = []
    for run in map(Path, run_dirs):
        path = run / "report.json" if run.is_dir() else run
        if not path.is_file():
            raise FileNotFoundError(f"{run}: no report.json (run `echogen-rl eval --benchmark ...` there first)")
        try:
            reports.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    return reports
