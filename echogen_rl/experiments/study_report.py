"""What a study writes: `study.json`, its plots and its tables, and the lines `echogen-rl study` prints (see
[`echogen_rl.experiments.study`])."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from echogen_rl.eval.evaluation import write_report
from echogen_rl.eval.reward_check import DRAWINGS
from echogen_rl.eval.visualize import save_png
from echogen_rl.experiments.provenance import portable_paths


def report_name(split: str) -> str:
    """The name of a study's files: a validation study beside a held-out one writes files of its own, never over the
    other's."""
    return "study" if split == "held_out" else f"study_{split}"


def write_study(report: dict, out: Path) -> None:
    """Writes `report` to `out` as `study.json`, its plots `study.png` and `study_differences.png`, and `study.md`
    (named by [`report_name`] for another split)."""
    name = report_name(report["split"])
    report = portable_paths(report, out)
    write_report(report, out / f"{name}.json")
    plot_study(report, out / f"{name}.png")
    plot_differences(report, out / f"{name}_differences.png")
    markdown = out / f".{name}.md.tmp"  # renamed into place, as `write_report` does: never half-written
    markdown.write_text(format_markdown(report))
    markdown.replace(out / f"{name}.md")


def format_results(report: dict, out: Path) -> str:
    """What `echogen-rl study` prints at its end: the arms' and the comparisons' tables, each reward grounder's
    check, the reward gate's failure, and where the study's files are in `out`."""
    name = report_name(report["split"])
    lines = [format_arms(report), format_comparisons(report)]
    for arm, check in report["reward_check"].items():
        cells = ", ".join(f"{d} {check[d]['mean']:.3f}" for d in DRAWINGS if d in check)
        lines.append(f"reward check, {arm} grounder's cycle IoU: {cells}")
    gate = report["reward_gate"]
    if not gate["passed"]:
        reasons = "; ".join(gate["reasons"])
        lines.append(f"reward gate failed ({reasons}): CycleRL's comparisons are marked as no evidence")
    lines.append(f"study: {out / f'{name}.json'}, {out / f'{name}.png'}; {report['seconds']:.0f} s")
    return "\n".join(lines)


def plot_study(summary: dict, path: Path, metrics=("cycle_miou_ref", "tolerant_l2i", "strict50", "color")) -> Path:
    """Bars of each arm's mean with its 95% interval, one panel per metric (T=1 sampling)."""
    arms = list(summary["arms"])  # PMTP, then each stage beside its controls, as the study scored them
    colors = {
        "pmtp": (120, 120, 120),
        "djo": (31, 119, 180),
        "pmtp_continued": (158, 202, 225),
        "cyclerl": (214, 39, 40),
        "sft_continued": (252, 146, 114),
        "cyclerl_shuffled": (253, 208, 162),
    }
    panel_w, panel_h, pad = 360, 300, 40
    image = Image.new("RGB", (panel_w * len(metrics), panel_h + 90), "white")
    draw = ImageDraw.Draw(image)
    for p, metric in enumerate(metrics):
        x0 = p * panel_w
        draw.text((x0 + pad, 8), f"{metric} (T=1), mean and 95% CI", fill="black")
        draw.line([(x0 + pad, 30), (x0 + pad, panel_h)], fill="black")
        draw.line([(x0 + pad, panel_h), (x0 + panel_w - 10, panel_h)], fill="black")
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = panel_h - tick * (panel_h - 40)
            draw.text((x0 + 5, y - 6), f"{tick:.2f}", fill="black")
        width = (panel_w - pad - 20) / len(arms)
        for a, arm in enumerate(arms):
            stat = summary["arms"].get(arm, {}).get(metric)
            if not stat:
                continue
            left = x0 + pad + 5 + a * width
            y = lambda v: panel_h - max(0.0, min(1.0, v)) * (panel_h - 40)  # noqa: E731
            draw.rectangle([left, y(stat["mean"]), left + width - 8, panel_h], fill=colors[arm])
            mid = left + (width - 8) / 2
            draw.line([(mid, y(stat["ci_low"])), (mid, y(stat["ci_high"]))], fill="black", width=2)
            for v in (stat["ci_low"], stat["ci_high"]):
                draw.line([(mid - 5, y(v)), (mid + 5, y(v))], fill="black", width=2)
    for a, arm in enumerate(arms):
        draw.rectangle([10 + a * 190, panel_h + 40, 24 + a * 190, panel_h + 54], fill=colors[arm])
        draw.text((30 + a * 190, panel_h + 41), arm, fill="black")
    return save_png(image, path)


def plot_differences(
    summary: dict,
    path: Path,
    comparisons=("djo_vs_pmtp_continued", "cyclerl_vs_sft_continued", "cyclerl_vs_shuffled_reward"),
    metrics=("cycle_miou_ref", "tolerant_l2i", "strict50", "ap", "grounding_miou"),
) -> Path:
    """The paired differences of each comparison with their 95% intervals, one panel per comparison, 0 marked: the
    picture of what a stage adds over its control (the arms' own intervals hide it, being mostly between layouts)."""
    panel_w, panel_h, pad = 420, 260, 110
    comparisons = [c for c in comparisons if c in summary["comparisons"]]
    rows = [(m, summary["comparisons"][c][m]) for c in comparisons for m in metrics]
    span = max(0.05, max(max(abs(r["ci_low"]), abs(r["ci_high"])) for _, r in rows))
    image = Image.new("RGB", (panel_w * len(comparisons), panel_h), "white")
    draw = ImageDraw.Draw(image)
    for p, name in enumerate(comparisons):
        x0 = p * panel_w
        evidence = summary["comparisons"][name].get("evidence", True)
        if not evidence:  # greyed: the reward gate failed, so no interval of this comparison counts for or against
            draw.rectangle([x0, 0, x0 + panel_w - 1, panel_h - 1], fill=(235, 235, 235))
        title = "difference, 95% CI" if evidence else "no evidence: reward gate failed"
        draw.text((x0 + 10, 6), f"{name} (T=1): {title}", fill="black")
        mid = x0 + pad + (panel_w - pad - 20) / 2
        scale = (panel_w - pad - 20) / 2 / span
        draw.line([(mid, 28), (mid, panel_h - 24)], fill=(150, 150, 150))
        draw.text((mid - 4, panel_h - 20), "0", fill="black")
        draw.text((x0 + pad - 4, panel_h - 20), f"{-span:+.2f}", fill="black")
        draw.text((x0 + panel_w - 50, panel_h - 20), f"{span:+.2f}", fill="black")
        for i, metric in enumerate(metrics):
            cell = summary["comparisons"][name][metric]
            y = 44 + i * (panel_h - 80) / max(1, len(metrics) - 1)
            draw.text((x0 + 10, y - 6), metric, fill="black")
            above = cell["ci_low"] > 0
            color = (44, 160, 44) if above else (214, 39, 40) if cell["ci_high"] < 0 else (90, 90, 90)
            color = color if evidence else (150, 150, 150)
            draw.line([(mid + cell["ci_low"] * scale, y), (mid + cell["ci_high"] * scale, y)], fill=color, width=3)
            x = mid + cell["diff"] * scale
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    return save_png(image, path)


def _mean_cell(stat: dict) -> str:
    """`mean [ci_low, ci_high]`, or the mean alone where there is no interval (PMTP's one run)."""
    return f"{stat['mean']:.3f}" + (f" [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]" if "ci_low" in stat else "")


def _difference_cell(stat: dict) -> str:
    return f"{stat['diff']:+.3f} [{stat['ci_low']:+.3f}, {stat['ci_high']:+.3f}]"


def format_comparisons(summary: dict, metrics=("cycle_miou_ref", "tolerant_l2i", "strict50", "ap", "color")) -> str:
    """The comparisons as a table of `diff [ci_low, ci_high]`."""
    width = max(len(n) for n in summary["comparisons"])
    lines = [f"{'comparison (T=1)':<{width}}  " + "  ".join(f"{m:>24}" for m in metrics)]
    for name, row in summary["comparisons"].items():
        cells = [_difference_cell(row[m]) for m in metrics]
        lines.append(f"{_marked(name, row):<{width + 2}}" + "  ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def _marked(name: str, row: dict) -> str:
    """A comparison's name, with `(no evidence)` where its CycleRL arm failed the reward gate."""
    return name if row.get("evidence", True) else f"{name} (no evidence: reward gate failed)"


MARKDOWN_METRICS = (
    "cycle_miou_ref",
    "tolerant_l2i",
    "strict50",
    "ap",
    "color",
    "grounding_miou",
    "cycle_miou_ref_greedy",
    "tolerant_l2i_greedy",
    "ap_greedy",
)


def format_markdown(report: dict, metrics: Sequence[str] = MARKDOWN_METRICS) -> str:
    """`study.md`: the arms' means and the paired differences as Markdown tables, with their 95% intervals."""
    metrics = [m for m in metrics if all(m in row for row in report["arms"].values())]
    header = " | ".join(metrics)
    rule = "| --- " * (len(metrics) + 1) + "|"
    lines = [f"| arm ({report['seeds']} seeds; PMTP 1) | {header} |", rule]
    for arm, row in report["arms"].items():
        cells = [_mean_cell(row[m]) for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"| paired difference, 95% CI | {header} |", rule]
    for name, row in report["comparisons"].items():
        cells = [_difference_cell(row[m]) for m in metrics]
        label = f"`{name}`" if row.get("evidence", True) else f"`{name}` (no evidence: reward gate failed)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    gate = report.get("reward_gate")
    if gate:
        verdict = "passed" if gate["passed"] else "failed: " + "; ".join(gate["reasons"])
        lines += [
            "",
            f"Reward gate (the {gate['grounder']} grounder, correct - filled >= {gate['margin']}): {verdict}",
        ]
    return "\n".join(lines) + "\n"


def format_arms(summary: dict, metrics=("cycle_miou_ref", "tolerant_l2i", "strict50", "ap", "color")) -> str:
    width = max(len(n) for n in summary["arms"])
    lines = [f"{'arm (T=1)':<{width}}  " + "  ".join(f"{m:>22}" for m in metrics)]
    for name, row in summary["arms"].items():
        cells = [_mean_cell(row[m]) for m in metrics]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


REPLICATED_METRICS = ("cycle_miou_ref", "tolerant_l2i", "strict50", "grounding_miou", "cycle_miou_ref_greedy")
REPLICATED_COMPARISONS = ("djo_vs_pmtp_continued", "cyclerl_vs_sft_continued", "cyclerl_vs_shuffled_reward")


def format_replication(
    reports: dict[str, dict],
    metrics: Sequence[str] = REPLICATED_METRICS,
    comparisons: Sequence[str] = REPLICATED_COMPARISONS,
) -> str:
    """The paired differences of two or more seed sets side by side (Markdown): a stage's claim stands on a metric
    only when every set's interval is above 0, and a CycleRL row counts only where its reward gate passed. With one
    set a claim does not stand yet, however high its interval."""
    names = list(reports)
    if not names:
        return "No seed set has run yet.\n"
    header = " | ".join(f"set {n}" for n in names)
    lines = [f"| comparison | metric | {header} | stands |", "| --- " * (len(names) + 3) + "|"]
    for comparison in comparisons:
        if not all(comparison in r["comparisons"] for r in reports.values()):
            continue
        rows = [r["comparisons"][comparison] for r in reports.values()]
        evidence = all(row.get("evidence", True) for row in rows)
        for metric in metrics:
            cells = [_difference_cell(row[metric]) for row in rows]
            above = all(row[metric]["ci_low"] > 0 for row in rows)
            verdict = ("yes" if above else "no") if evidence else "no evidence (reward gate)"
            if verdict == "yes" and len(names) < 2:
                verdict = "not yet (one set)"
            lines.append(f"| `{comparison}` | {metric} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines) + "\n"
