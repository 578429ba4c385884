"""Renders the docs' tables from the committed results, between `<!-- rendered: NAME -->` and `<!-- /rendered -->`.

    python docs/render.py          # rewrite README.md and docs/*.md in place (`make docs`)
    python docs/render.py --check  # exit 1 and name the blocks that differ (`make test` runs the same check)

Each block names the renderer; the renderer reads only files under `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from echogen_rl.experiments.demo import format_stage_table
from echogen_rl.experiments.study_report import format_replication

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- rendered: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /rendered -->)", re.S)


def _json(relative: str) -> dict:
    return json.loads((RESULTS / relative).read_text())


def demo_table() -> str:
    return "```\n" + format_stage_table(_json("demo/report.json")["stages"]) + "\n```\n"


def replication() -> str:
    return format_replication({"a": _json("study/study.json"), "b": _json("study_b/study.json")}) + "\n"


RENDERERS = {"demo-table": demo_table, "replication": replication}


def render(text: str, where: str) -> str:
    """`text` with every rendered block replaced by its renderer's output."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise KeyError(f"{where}: no renderer {name!r} (known: {', '.join(RENDERERS)})")
        return match.group(1) + RENDERERS[name]() + match.group(4)

    return BLOCK.sub(replace, text)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def stale() -> list[str]:
    """The pages whose rendered blocks differ from what the results give."""
    return [str(p.relative_to(REPO)) for p in pages() if render(p.read_text(), p.name) != p.read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if a page is out of date")
    args = parser.parse_args()
    if args.check:
        out_of_date = stale()
        for page in out_of_date:
            print(f"{page}: a rendered block differs from the results; run `make docs`", file=sys.stderr)
        return 1 if out_of_date else 0
    for page in pages():
        text = page.read_text()
        new = render(text, page.name)
        if new != text:
            page.write_text(new)
            print(f"rendered {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
