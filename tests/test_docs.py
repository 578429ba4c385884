"""The README and docs: rendered tables equal what the committed results give, links resolve, the README stays
short, and its Python example runs as printed."""

import importlib.util
import re
from pathlib import Path

from echogen_rl.experiments.provenance import portable_paths

REPO = Path(__file__).resolve().parents[1]


def _render_module():
    spec = importlib.util.spec_from_file_location("docs_render", REPO / "docs" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_tables_match_the_committed_results_and_the_check_can_fail(monkeypatch):
    render = _render_module()
    assert render.stale() == []
    blocks = {m.group("name") for p in render.pages() for m in render.BLOCK.finditer(p.read_text())}
    assert blocks == set(render.RENDERERS)  # every renderer is used, every block has one
    monkeypatch.setitem(render.RENDERERS, "replication", lambda: "| a changed result |\n")
    assert render.stale() == ["docs/study.md"]


def test_links_resolve_and_the_readme_stays_short():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_the_readme_python_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    body = readme.split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    monkeypatch.chdir(tmp_path)  # its relative paths (outputs/, recipes/) resolve here
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 20
    assert namespace["codes"].shape == (1, 64)
    assert capsys.readouterr().out.strip().endswith(repr(namespace["found"].layout.entities))


def test_committed_results_name_no_machine_path_and_record_what_ran():
    import json
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "benchmarks/results", "docs"], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.split()
    assert files
    absolute = re.compile(r"(?<![\w.<])/(?:work|tmp|root|home|opt|usr|Users|mnt|var)/")
    for name in files:
        path = REPO / name
        if path.suffix not in (".json", ".md", ".log"):
            continue
        text = path.read_text()
        assert not absolute.search(text), f"{name}: {absolute.search(text).group(0)}..."
        if path.suffix == ".json":
            data = json.loads(text)
            assert "provenance" in data or {"commit", "hardware"} <= set(data), f"{name}: no provenance"


def test_portable_paths_name_a_folder_relative_to_the_working_directory_or_by_its_role(tmp_path, monkeypatch):
    record = {"output_dir": str(tmp_path / "run" / "pmtp"), "nested": [{"cache": str(tmp_path / "run" / "cache")}]}
    monkeypatch.chdir(tmp_path)
    assert portable_paths(record, tmp_path / "run") == {"output_dir": "run/pmtp", "nested": [{"cache": "run/cache"}]}
    (tmp_path / "inside").mkdir()
    monkeypatch.chdir(tmp_path / "inside")  # the folder now lies outside the working directory
    outside = portable_paths(record, tmp_path)
    assert (
        outside["output_dir"] == "<output_dir>/run/pmtp" and outside["nested"][0]["cache"] == "<output_dir>/run/cache"
    )


def _doc_commands():
    """Every command of the docs' bash blocks, continuation lines joined and comments dropped."""
    for page in sorted((REPO / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #", 1)[0].strip()
                if line and not line.startswith("#"):
                    yield page.name, line


def test_the_docs_commands_name_what_exists_and_parse():
    """The docs' commands cannot drift: each `echogen-rl` command parses, each recipe launch names a recipe and
    config that exist and only fields the recipe knows, each `make` target exists. (Running them is other tests'
    work: test_dry_run, test_study, test_reward_gate, test_observe, test_vllm_engine; GPU lines are marked so.)"""
    import shlex

    from echogen_rl.cli import build_parser
    from echogen_rl.scripts.runner import load_recipe, recipe_classes

    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    seen = set()
    for page, command in _doc_commands():
        argv = shlex.split(command)
        seen.add(argv[0])
        if argv[0] == "echogen-rl":
            argv = [a for a in argv[1:] if not a.startswith("[")]  # `[--steps N]`: optional, shown as such
            argv = [a for a in argv if not a.endswith("]") or a.startswith("--")]
            build_parser().parse_args(argv)  # exits (fails the test) on an unknown command or flag
        elif "launch" in argv:
            script, config = argv[argv.index("launch") + 1], argv[argv.index("--config") + 1]
            assert (REPO / script).is_file() and (REPO / config).is_file(), (page, command)
            known = {f for cls in recipe_classes(load_recipe(Path(script).stem)) for f in cls.__dataclass_fields__}
            flags = {a.removeprefix("--") for a in argv if a.startswith("--") and a != "--config"}
            assert flags <= known, (page, flags - known)
        elif argv[0] == "make":
            assert argv[1] in targets, (page, command)
    assert {"echogen-rl", "make", "accelerate"} <= seen
