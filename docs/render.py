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


def demo_run() -> str:
    report = _json("demo/report.json")
    made = report["provenance"]
    stages = [s for s in ("pmtp", "pmtp_kinds", "djo", "cyclerl") if s in report["budget"]]  # older: no kinds
    budget = ", ".join(f"{stage} {report['budget'][stage]['max_steps']}" for stage in stages)
    return (
        f"Steps: {budget}; {report['held_out_layouts']} held-out layouts. Time: {report['seconds']:.0f} s in all, "
        f"{report['workers']} workers on {made['hardware']['cores']} cores ({made['hardware']['cpu']}), commit "
        f"`{made['commit'][:10]}{'+dirty' if made['commit'].endswith('+dirty') else ''}`.\n"
    )


def replication() -> str:
    return format_replication({"a": _json("study/study.json"), "b": _json("study_b/study.json")}) + "\n"


GIB = 2**30
DRY_RUN_ORDER = (
    "pmtp_janus_pro_1b_coco",
    "pmtp_janus_pro_1b_layoutsam",
    "djo_janus_pro_1b",
    "cyclerl_janus_pro_1b_full",
    "cyclerl_janus_pro_1b_lora",
    "pmtp_janus_pro_7b_coco",
    "djo_janus_pro_7b",
    "cyclerl_janus_pro_7b_full",
)


def _dry_runs(folder: str) -> list[dict]:
    found = {p.stem: json.loads(p.read_text()) for p in (RESULTS / folder).glob("*.json")}
    return [found[name] for name in DRY_RUN_ORDER if name in found]


def _config(report: dict) -> str:
    return "`" + report["config"].removeprefix("recipes/configs/") + "`"


def _estimates(report: dict) -> tuple[str, str]:
    estimate = report["estimate"]
    launch = estimate["launch"]
    kind = launch["kind"].removeprefix("DeepSpeed ") if launch["kind"].startswith("DeepSpeed") else launch["kind"]
    return (
        f"{estimate['single_device_bytes'] / GIB:.1f} GiB (batch {estimate['per_device_batch']})",
        f"{estimate['sharded_bytes'] / GIB:.1f} GiB ({kind}, {launch['num_processes']} processes)",
    )


def _table(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: a header of `columns`, its separator, then one line per row of cells."""
    lines = [columns, ["---"] * len(columns), *rows]
    return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)


def _ci(cell: dict) -> str:
    return f"{cell['diff']:+.3f} [{cell['ci_low']:+.3f}, {cell['ci_high']:+.3f}]"


def dry_run_cpu() -> str:
    columns = [
        "config",
        "step (s, CPU)",
        "tokens/step",
        "trainable params",
        "CPU peak RSS",
        "est. GPU memory, 1 device",
        "est. under the YAML's launch config",
    ]
    rows = []
    for report in _dry_runs("dry_run"):
        measured = report["measured"]
        (step,) = measured["steps"]
        sgd = " (sgd)" if report["changed"].get("optim") == "sgd" else ""
        trainable = f"{measured['parameters']['trainable'] / 1e9:.2f} B"
        peak = f"{measured['process_peak_bytes'] / GIB:.1f} GiB{sgd}"
        config = _config(report)
        if "depth" in measured:  # run at two depths, extrapolated to the full one (7B)
            depth = measured["depth"]
            layers = " and ".join(map(str, depth["measured_layers"]))
            config += f" (run at {layers} of {depth['layers']} layers, extrapolated)"
        rows.append([config, f"{step['seconds']:.1f}", str(step["tokens"]), trainable, peak, *_estimates(report)])
    return _table(columns, rows)


def dry_run_gpu() -> str:
    columns = [
        "config",
        "GPU",
        "steps (s)",
        "tokens/step",
        "peak memory",
        "estimate, 1 device",
        "estimate under the YAML's launch config",
    ]
    rows = []
    for report in _dry_runs("dry_run_gpu"):
        measured = report["measured"]
        steps = ", ".join(f"{s['seconds']:.1f}" for s in measured["steps"])
        rows.append(
            [
                _config(report),
                measured["device"],
                steps,
                str(measured["steps"][-1]["tokens"]),
                f"{measured['process_peak_bytes'] / GIB:.1f} GiB",
                *_estimates(report),
            ]
        )
    return _table(columns, rows)


def benchmarks() -> str:
    rollout, grounding = _json("rollout.json")["configs"], _json("grounding.json")
    scoring = _json("scoring_batch.json")
    rows = []
    for name, c in rollout.items():
        shape = (
            f"{c['num_layers']} layers x {c['hidden_size']}, {c['num_image_tokens']} codes, batch {c['batch_size']}"
        )
        rows.append(
            [
                f"rollout, {name} ({shape}), CFG 5, greedy, compiled engine (first call compiles: {c['compile_s']:.1f} s)",
                "`rollout.json`",
                f"{c['engine_images_per_s']:.2f} images/s",
                f"{c['hf_images_per_s']:.2f} images/s (`generate`)",
                f"{c['ratio_vs_hf']:.2f}x",
            ]
        )
        rows.append(
            [
                "same, eager engine",
                "`rollout.json`",
                f"{c['engine_eager_images_per_s']:.2f} images/s",
                f"{c['hf_images_per_s']:.2f} images/s",
                f"{c['ratio_eager_vs_hf']:.2f}x",
            ]
        )
    rows.append(
        [
            f"grounding, {grounding['config']}, {grounding['num_images']} images x {grounding['phrases_per_image']} phrases",
            "`grounding.json`",
            f"{grounding['grounder_images_per_s']:.1f} images/s",
            f"{grounding['naive_images_per_s']:.1f} images/s (`generate` per image)",
            f"{grounding['ratio_vs_naive']:.2f}x",
        ]
    )
    for file, how in (("packing", "segment attention"), ("packing_block", "a dense 4D block mask")):
        result = _json(f"{file}.json")
        rows.append(
            [
                f"PMTP step, LayoutSAM-like lengths, packed, {how}",
                f"`{file}.json`",
                f"{result['packed_tokens_per_s']:.0f} useful tokens/s",
                f"{result['unpacked_tokens_per_s']:.0f} (two padded task batches)",
                f"{result['ratio_vs_unpacked']:.2f}x",
            ]
        )
    batches = scoring["batches"]
    best = batches[max(batches, key=int)]
    same = "same" if best["same_as_baseline"] else "different"
    rows.append(
        [
            f"scoring {scoring['layouts']} held-out layouts (greedy), model `{scoring['model']}`, "
            f"batches of {max(batches, key=int)}",
            "`scoring_batch.json`",
            f"generate {best['generate_s']:.2f} s, ground {best['ground_s']:.2f} s",
            f"{batches['64']['generate_s']:.2f} s, {batches['64']['ground_s']:.2f} s (batches of 64)",
            f"{best['generate_ratio_vs_64']:.2f}x, {best['ground_ratio_vs_64']:.2f}x ({same} codes and groundings)",
        ]
    )
    return _table(["benchmark", "file", "ours", "baseline", "ratio"], rows)


def vllm_rollout() -> str:
    columns = [
        "config",
        "file",
        "torch engine (images/s)",
        "vLLM engine (images/s)",
        "vLLM / torch",
        "greedy codes equal",
        "engine start, weight sync",
    ]
    rows = []
    for file in ("rollout_vllm.json", "rollout_vllm_large.json"):
        for name, c in _json(file)["configs"].items():
            torch_side = f"{c['engine_eager_images_per_s']:.3g} eager"
            if "engine_images_per_s" in c:
                torch_side = f"{c['engine_images_per_s']:.3g} compiled, " + torch_side
            v = c["vllm"]
            shape = f"{c['num_layers']} x {c['hidden_size']}, {c['num_image_tokens']} codes, batch {c['batch_size']}"
            rows.append(
                [
                    f"{name} ({shape}, {c['dtype']})",
                    f"`{file}`",
                    torch_side,
                    f"{v['images_per_s']:.3g}",
                    f"{v['ratio_vs_torch']:.2f}x",
                    "yes" if v["parity_greedy"] else "no",
                    f"{v['start_s']:.1f} s, {v['sync_s']:.2f} s",
                ]
            )
    return _table(columns, rows)


CONTROL_METRICS = (
    "cycle_miou_ref_greedy",
    "color_greedy",
    "tolerant_l2i_greedy",
    "cycle_miou_ref",
    "color",
    "grounding_miou",
)
LOOP_GAIN = ("loop_and_i2l_vs_i2l_only", "cycle_miou_ref_greedy")  # what the loop itself adds, greedy


def djo_control() -> str:
    pairs = [
        ("loop_and_i2l_vs_pmtp_continued", "loop + I2L - PMTP continued"),
        ("loop_and_i2l_vs_i2l_only", "loop + I2L - I2L alone"),
        ("i2l_only_vs_pmtp_continued", "I2L alone - PMTP continued"),
    ]
    rows = []
    for name, result in _json("study/djo_control_sets.json")["sets"].items():
        seeds = ", ".join(map(str, result["seeds"]))
        for key, label in pairs:
            rows.append([f"{name} ({seeds})", label, *(_ci(result["differences"][key][m]) for m in CONTROL_METRICS)])
    return _table(["set (seeds)", "comparison", *(f"`{m}`" for m in CONTROL_METRICS)], rows)


def djo_summary() -> str:
    """DJO in a few lines for the README: its row on both seed sets, the audit, and the positive control."""
    sets = {"a": _json("study/study.json"), "b": _json("study_b/study.json")}
    row = {
        m: ", ".join(f"set {k} {_ci(r['comparisons']['djo_vs_pmtp_continued'][m])}" for k, r in sets.items())
        for m in ("cycle_miou_ref", "tolerant_l2i", "grounding_miou")
    }
    audit = _json("study/loop_audit.json")
    losses, grads = audit["losses"], audit["gradient_norms"]["self_forced_t1/tau1"]
    control = {
        k: r["differences"][LOOP_GAIN[0]][LOOP_GAIN[1]]
        for k, r in _json("study/djo_control_sets.json")["sets"].items()
    }
    gain = ", ".join(f"set {k} {_ci(cell)}" for k, cell in control.items())
    above = sum(cell["ci_low"] > 0 for cell in control.values())
    return (
        f"- DJO - PMTP continued (T=1): `cycle_miou_ref` {row['cycle_miou_ref']}; `tolerant_l2i` "
        f"{row['tolerant_l2i']}; `grounding_miou` {row['grounding_miou']}.\n"
        f"- What the loop sees: the model's own sampled image, which its grounder reads with loss "
        f"{losses['loop_self_forced_t1']:.3f} against {losses['i2l_real']:.3f} on the real image; the loop pulls on "
        f"`generation_head` with gradient norm {grads['generation_head/loop_image_side']:.3f} against "
        f"{grads['generation_head/l2i']:.3f} from `L_L2I` (cosine {grads['generation_head/cosine_l2i_loop_image']:+.2f}; "
        f"`benchmarks/results/study/loop_audit.json`).\n"
        f"- The positive control: from an under-trained PMTP, the loop (beside the real-image grounding loss, against "
        f"that loss alone over the same steps) adds greedy `cycle_miou_ref` {gain}; its interval is above 0 on "
        f"{above} of {len(control)} seed sets (`benchmarks/results/study/djo_control_sets.json`).\n"
    )


def paper_eval_cpu() -> str:
    """The real-size proof of every `eval --benchmark` path on the CPU (`benchmarks/paper_eval_check.py`)."""
    report = _json("paper_eval_cpu.json")
    made = report["provenance"]
    rows = [
        [name, str(run["items"]), f"{run['seconds']:.0f}", ", ".join(sorted(run["results"]))]
        for name, run in report["runs"].items()
    ]
    return (
        _table(["benchmark", "layouts", "seconds", "results computed"], rows)
        + f"\n{report['architecture']} (random init, float32) on {made['hardware']['cores']} cores "
        f"({made['hardware']['cpu']}); checkpoint written in {report['checkpoint_seconds']:.0f} s; commit "
        f"`{made['commit'][:10]}`.\n"
    )


# The studies of the two-phase PMTP (the second phase teaches the grounder shape), per second phase: one cosine
# cycle of 3000 steps, then the shipped two; set b where it has run.
KINDS_STUDIES = {
    "one_cycle": {"a": "study_kinds/study.json", "b": "study_kinds_b/study.json"},
    "two_cycles": {"a": "study_two_cycles/study.json", "b": "study_two_cycles_b/study.json"},
    # The world with room after PMTP (8 x 8, up to 6 shapes): set a's runs are its validation study's, scored on
    # set a's held-out layouts; set b trained from scratch on seeds 100-102.
    "six_shapes": {"a": "study_6shapes/study.json", "b": "study_6shapes_b/study.json"},
}


def _kinds_sets(study: str) -> dict[str, dict]:
    return {name: _json(path) for name, path in KINDS_STUDIES[study].items() if (RESULTS / path).is_file()}


def replication_kinds(study: str = "one_cycle") -> str:
    return format_replication(_kinds_sets(study))


REWARD_DRAWINGS = ("correct", "filled", "other_kind", "other_color", "empty")


def reward_gate_kinds(study: str = "one_cycle") -> str:
    """Each set's reward check per grounder, and its gate (the DJO grounder's)."""
    if not _kinds_sets(study):
        return "No seed set has run yet.\n"
    rows = []
    for name, report in _kinds_sets(study).items():
        for grounder, label in (("pmtp", "PMTP (scores cycle_miou_ref)"), ("djo", "DJO (CycleRL reward)")):
            check = report["reward_check"][grounder]
            gate = ("passed" if report["reward_gate"]["passed"] else "failed") if grounder == "djo" else ""
            means = [f"{check[d]['mean']:.3f}" if d in check else "-" for d in REWARD_DRAWINGS]
            diffs = [_ci(check[f"correct_minus_{d}"]) for d in ("filled", "other_kind")]
            color = _ci(check["correct_minus_other_color"]) if "other_color" in check else "-"
            rows.append([label, name, *means, *diffs, color, gate])
    columns = ["grounder", "set", "correct", "filled", "other kind", "other color", "empty", "correct - filled"]
    return _table([*columns, "correct - other kind", "correct - other color", "gate"], rows)


def kinds_validation() -> str:
    """The second phase and DJO's kind negatives, chosen on the validation split (256 layouts; seed 0, then the
    chosen phase and one alternative on two more first-phase seeds)."""
    runs = _json("study/kind_negatives_validation.json")["runs"]
    rows = []

    def order(item):
        settings = item[1].get("settings") or {}
        return (
            settings.get("stage") != "pmtp",
            settings.get("starts_from", ""),
            settings.get("max_steps", 0),
            settings.get("seed", 0),
            item[0],
        )

    for _, row in sorted(runs.items(), key=order):
        settings = row.get("settings")
        if not settings or settings.get("starts_from") == "tiny-janus":
            continue  # the one-phase rows: the table above
        check, scores = row["reward_check"], row["l2i_and_grounding"]
        lr = settings.get("learning_rate", "DJO's")
        steps = settings.get("max_steps", "DJO's")
        cycles = (settings.get("lr_scheduler_kwargs") or {}).get("num_cycles")
        steps = f"{steps} ({cycles} cycles)" if cycles else str(steps)
        rows.append(
            [
                settings["stage"].upper(),
                str(settings.get("seed", 0)),
                f"`{settings['starts_from']}`",
                f"{settings['kind_negative_prob']:g}",
                steps,
                f"{lr:g}" if isinstance(lr, float) else lr,
                f"{check['correct']['mean']:.3f}",
                f"{check['filled']['mean']:.3f}",
                _ci(check["correct_minus_filled"]),
                f"{scores['strict50_t1']:.3f}",
                f"{scores['color_t1']:.3f}",
            ]
        )
    columns = [
        "stage",
        "seed",
        "starts from",
        "kind negatives",
        "steps",
        "lr",
        "correct",
        "filled",
        "correct - filled",
    ]
    return _table([*columns, "strict50 (T=1)", "color (T=1)"], rows)


def _sets_summary(label: str, sets: dict[str, dict]) -> str:
    """One bullet: each set's reward gate, then CycleRL - SFT continued per metric, set by set."""

    def gate(r):
        check = r["reward_check"]["djo"]
        color = f" and {_ci(check['correct_minus_other_color'])}" if "other_color" in check else " and -"
        return f"{_ci(check['correct_minus_filled'])}{color} ({'passed' if r['reward_gate']['passed'] else 'failed'})"

    gates = ", ".join(f"set {n} {gate(r)}" for n, r in sets.items())
    metrics = "; ".join(
        f"`{m}` "
        + ", ".join(f"set {n} {_ci(r['comparisons']['cyclerl_vs_sft_continued'][m])}" for n, r in sets.items())
        for m in ("cycle_miou_ref", "tolerant_l2i", "strict50")
    )
    margin = next(iter(sets.values()))["reward_gate"]["margin"]
    return (
        f"- {label}: the reward grounder's cycle IoU, correct - filled and correct - other color, {gates} (gate at "
        f"{margin}); CycleRL - SFT "
        f"continued (T=1) {metrics}; a set whose gate fails is no evidence.\n"
    )


def kinds_summary() -> str:
    """The two-phase studies in a few lines for the README: per world, the reward gate and CycleRL against SFT
    continued on each seed set, and where CycleRL's signal dies."""
    lines = []
    sets = _kinds_sets("two_cycles")
    if sets:
        lines.append(_sets_summary("Up to 3 shapes", sets))
        pmtp = ", ".join(f"set {n} {r['arms']['pmtp']['strict50']['mean']:.3f}" for n, r in sets.items())
        below = ", ".join(f"set {n} {_ci(r['comparisons']['cyclerl_vs_pmtp']['strict50'])}" for n, r in sets.items())
        groups = {n: _json(str(Path(KINDS_STUDIES["two_cycles"][n]).parent / "cyclerl_groups.json")) for n in sets}
        agree = ", ".join(f"set {n} {g['summary']['frac_reward_zero_std']['mean']:.0%}" for n, g in groups.items())
        lines.append(
            f"- Where CycleRL's signal dies there: PMTP alone draws the phrase's shape and color (`strict50`) {pmtp}, "
            f"and no later stage improves on it (CycleRL - PMTP {below}); in CycleRL's groups of images for one "
            f"layout, {agree} of the groups earned one reward for every image, which gives GRPO no advantage.\n"
        )
    room = _kinds_sets("six_shapes")
    if room:
        pmtp = ", ".join(f"set {n} {r['arms']['pmtp']['strict50']['mean']:.3f}" for n, r in room.items())
        lines.append(_sets_summary(f"Up to 6 shapes (PMTP's `strict50` {pmtp})", room))
    folder = SIX_SHAPES_VALIDATION["shipped (lr 5e-4)"]
    if (RESULTS / folder / "cyclerl_signal.json").is_file():
        signal = _json(f"{folder}/cyclerl_signal.json")
        within = signal["within_group"]
        learn = _json(f"{folder}/cyclerl_learnability.json")["runs"]
        background = {b: learn[f"background_beta{b}"][-1]["reward"] for b in ("0", "0.4")}
        lines.append(
            "- Where it dies with 6 shapes (validation, seed 0): within a group of images for one layout the reward "
            f"correlates {within['strict50']['correlation']:.2f} with the oracle's `strict50`, "
            f"{within['tolerant_l2i']['correlation']:.2f} with `tolerant_l2i` and "
            f"{within['readable']['correlation']:.2f} with whether the grounder's answer has no problem; "
            f"the shipped KL (`beta: 0.4`) holds the policy on a reward it climbs without it (background share "
            f"{background['0.4']:.2f} against {background['0']:.2f} after 40 steps), and without it the cycle reward "
            "still does not rise.\n"
        )
    return "".join(lines)


# The world with headroom after PMTP (8 x 8, up to 6 shapes), on the validation split: the shipped CycleRL, then
# each variant `benchmarks/cyclerl_validation.py` trains from the same PMTP and DJO runs, as it is scored.
SIX_SHAPES_VALIDATION = {"shipped (lr 5e-4)": "study_6shapes_validation"}


def six_shapes_validation() -> str:
    """CycleRL against its controls in the 6-shape world, per variant, on the validation layouts."""
    found = {
        name: (_json(f"{folder}/study_validation.json"), RESULTS / folder / "cyclerl_groups.json")
        for name, folder in SIX_SHAPES_VALIDATION.items()
        if (RESULTS / folder / "study_validation.json").is_file()
    }
    rows = []
    for comparison in ("cyclerl_vs_sft_continued", "cyclerl_vs_shuffled_reward", "cyclerl_vs_djo"):
        for metric in ("cycle_miou_ref", "tolerant_l2i", "strict50"):
            cells = [_ci(report["comparisons"][comparison][metric]) for report, _ in found.values()]
            rows.append([f"`{comparison}`", metric, *cells])
    pmtp = [report["arms"]["pmtp"]["strict50"] for report, _ in found.values()]
    rows.append(
        ["PMTP alone", "strict50", *(f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" for m in pmtp)]
    )
    check = [report["reward_check"]["djo"]["correct_minus_filled"] for report, _ in found.values()]
    rows.append(["reward grounder (DJO)", "correct - filled", *(_ci(c) for c in check)])
    zero = [
        f"{json.loads(groups.read_text())['summary']['frac_reward_zero_std']['mean']:.0%}" if groups.is_file() else "-"
        for _, groups in found.values()
    ]
    rows.append(["CycleRL's groups", "one reward for all 8 images", *zero])
    return _table(["comparison (T=1)", "metric", *found], rows)


COLOR_VALIDATION = "study_6shapes_validation/color_negatives"


def color_validation() -> str:
    """Each grounder tried for color on the 6-shape validation split: its reward check, the correct drawing asked in
    reverse order, and its L2I scores (`benchmarks/color_negatives_validation.py`)."""
    files = sorted((RESULTS / COLOR_VALIDATION).glob("color_negatives_validation_*.json"))
    rows, seen = [], set()
    for path in files:
        report = json.loads(path.read_text())
        steps = {"djo": "DJO's 200", "pmtp_base": "the first phase's"}.get(report["stage"])
        steps = steps or f"{report['steps']} at {report['learning_rate']:g}"
        for arm, row in report["arms"].items():
            if arm in seen:
                continue  # a control shared by several files
            seen.add(arm)
            check = row["reward_check"]
            rows.append(
                [
                    f"`{arm}`",
                    steps,
                    str(len(report["seeds"])),
                    *(f"{check[d]['mean']:.3f}" for d in ("correct", "filled", "other_color")),
                    _ci(check["correct_minus_other_color"]),
                    f"{check['correct_reversed_query']['mean']:.3f}",
                    f"{check['correct_one_phrase']['mean']:.3f} / {check['other_color_one_phrase']['mean']:.3f}",
                    *(f"{row[m]['mean']:.3f}" for m in ("strict50", "color")),
                    "passed" if row["reward_gate"]["passed"] else "failed",
                ]
            )
    columns = ["grounder", "steps, lr", "seeds", "correct", "filled", "other color", "correct - other color"]
    asked = ["correct, reversed query", "one phrase per query: correct / other color"]
    return _table([*columns, *asked, "strict50 (T=1)", "color (T=1)", "gate"], rows)


RENDERERS = {
    "demo-table": demo_table,
    "demo-run": demo_run,
    "replication": replication,
    "dry-run-cpu": dry_run_cpu,
    "dry-run-gpu": dry_run_gpu,
    "benchmarks": benchmarks,
    "vllm-rollout": vllm_rollout,
    "djo-control": djo_control,
    "djo-summary": djo_summary,
    "paper-eval-cpu": paper_eval_cpu,
    "replication-kinds": replication_kinds,
    "reward-gate-kinds": reward_gate_kinds,
    "replication-two-cycles": lambda: replication_kinds("two_cycles"),
    "reward-gate-two-cycles": lambda: reward_gate_kinds("two_cycles"),
    "kinds-validation": kinds_validation,
    "kinds-summary": kinds_summary,
    "six-shapes-validation": six_shapes_validation,
    "replication-six-shapes": lambda: replication_kinds("six_shapes"),
    "reward-gate-six-shapes": lambda: reward_gate_kinds("six_shapes"),
    "color-validation": color_validation,
}


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
