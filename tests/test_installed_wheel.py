"""The package as a user installs it: its wheel in a fresh venv, run from a folder outside the repository.

The fresh venv sees the test venv's third-party packages through a path entry (so nothing is downloaded), but not
the repository's editable install: that is set up by a `.pth` file, and `.pth` files of a path entry are not run.
`make test-wheel` runs this (CI runs it after `make test`).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`(python, env, workdir)`: a fresh venv holding only the wheel, and an empty folder to run in."""
    root = tmp_path_factory.mktemp("wheel")
    wheels = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(wheels)],
        check=True,
        cwd=root,
    )
    (wheel,) = wheels.glob("echogen_rl-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "test-venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)], check=True
    )
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return python, env, work


def _run(installed, *args, timeout=600):
    python, env, work = installed
    done = subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_wheel_is_what_runs_and_it_holds_the_shipped_configs(installed):
    python, _, work = installed
    out = _run(installed, "-c", "import echogen_rl, echogen_rl.scripts; print(echogen_rl.__file__)").stdout.strip()
    assert not Path(out).is_relative_to(REPO) and Path(out).is_relative_to(python.parent.parent), out
    listed = _run(installed, "-c", "from echogen_rl.models.architectures import SHIPPED_CONFIGS as c; print(c)")
    configs = Path(listed.stdout.strip())
    assert sorted(p.name for p in configs.glob("*/shapes_tiny.yaml")) == ["shapes_tiny.yaml"] * 3
    assert not (work / "recipes").exists()


def test_demo_quick_from_the_wheel(installed):
    _, _, work = installed
    _run(installed, "-m", "echogen_rl.cli", "demo", "--quick", "--jobs", "1", "--output-dir", "demo")
    report = json.loads((work / "demo" / "report.json").read_text())
    assert set(report["stages"]) >= {"pmtp", "djo", "cyclerl"}
    assert report["configs"]["pmtp"] == "recipes/configs/pmtp/shapes_tiny.yaml"


def test_dry_run_of_a_shipped_tiny_config_from_the_wheel(installed):
    python, _, work = installed
    config = _run(installed, "-c", "from echogen_rl.models.architectures import SHIPPED_CONFIGS as c; print(c)")
    config = Path(config.stdout.strip()) / "pmtp" / "shapes_tiny.yaml"
    _run(installed, "-m", "echogen_rl.cli", "dry-run", "--config", str(config), "--json", "dry.json")
    report = json.loads((work / "dry.json").read_text())
    assert report["stage"] == "pmtp" and len(report["measured"]["steps"]) == 1
    assert report["config"] == "recipes/configs/pmtp/shapes_tiny.yaml", report["config"]


def test_accelerate_launch_of_a_recipe_from_another_folder(installed):
    _, _, work = installed
    shutil.copy(REPO / "recipes" / "pmtp.py", work / "pmtp.py")  # a user's copy of the entry point
    config = _run(installed, "-c", "from echogen_rl.models.architectures import SHIPPED_CONFIGS as c; print(c)")
    config = Path(config.stdout.strip()) / "pmtp" / "shapes_tiny.yaml"
    _run(
        installed,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "pmtp.py",
        "--config",
        str(config),
        "--max_steps",
        "2",
        "--num_train_samples",
        "16",
        "--output_dir",
        "run",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
    )
    assert (work / "run" / "model.safetensors").is_file() and (work / "outputs" / "tiny-janus").is_dir()


def test_the_benchmarks_from_the_wheel(installed):
    _, _, work = installed
    cli = ("-m", "echogen_rl.cli")
    _run(installed, *cli, "init-tiny", "bench-tiny")
    _run(installed, *cli, "eval-samples", "samples", "--num-layouts", "4")
    common = ("--model", "bench-tiny", "--palette", "--device", "cpu", "--batch-size", "2")
    s = "samples"
    coco = ("--instances", f"{s}/instances_val2017.json", "--captions", f"{s}/captions_val2017.json")
    coco += ("--image-dir", f"{s}/val2017", "--detector", "grounder")
    _run(installed, *cli, "eval", "--benchmark", "coco", *common, *coco, "--output-dir", "coco")
    sam = ("--rows", f"{s}/layoutsam_eval.jsonl", "--judge", f"{s}/judge")
    _run(installed, *cli, "eval", "--benchmark", "layoutsam", *common, *sam, "--output-dir", "sam")
    ref = ("--refs", f"{s}/refs.json", "--image-dir", f"{s}/val2017")
    _run(installed, *cli, "eval", "--benchmark", "refexp", *common, *ref, "--output-dir", "ref")
    for run, key in (("coco", "coco"), ("sam", "layoutsam"), ("ref", "refexp")):
        report = json.loads((work / run / "report.json").read_text())
        assert key in report["results"] and report["provenance"]["versions"], report
    table = _run(installed, *cli, "eval-table", "coco", "sam", "ref").stdout.splitlines()
    assert len(table) == 3, table  # one model: one row
    cells = dict(zip(*([c.strip() for c in line.split("|")[1:-1]] for line in (table[0], table[2]))))
    assert cells["Model"] == "bench-tiny" and cells["FID"] == "–"  # FID was not asked for
    for column in ("Spatial", "Color", "Ref Acc@0.5", "Ref mAcc"):
        assert 0.0 <= float(cells[column]) <= 100.0, cells
