"""The study end to end on a quick budget: every arm trains from the shipped configs and is scored."""

import json
import logging

import numpy as np
import pytest

from echogen_rl.data.shapes import (
    ShapesConfig,
    build_shapes_dataset,
    detect_from_codes,
    render_codes,
    render_filled_boxes,
)
from echogen_rl.eval.reward_check import DRAWINGS, reward_check
from echogen_rl.experiments.study import StudyBudget, run_study
from echogen_rl.experiments.study_scoring import score_codes, scores_path, study_layouts
from echogen_rl.experiments.study_statistics import COMPARISONS, summarize
from echogen_rl.layout import Layout
from echogen_rl.models.grounding import GroundingResult


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(out, StudyBudget.quick())


def test_study_writes_paired_comparisons_with_intervals(quick_study):
    out, report = quick_study
    saved = json.loads((out / "study.json").read_text())
    assert set(saved["comparisons"]) == set(COMPARISONS)
    for name in ("djo_vs_pmtp_continued", "cyclerl_vs_sft_continued", "cyclerl_vs_shuffled_reward"):
        for metric in ("cycle_miou_ref", "tolerant_l2i", "ap", "cycle_miou_ref_greedy", "strict50"):
            cell = saved["comparisons"][name][metric]
            assert cell["ci_low"] <= cell["diff"] <= cell["ci_high"], (name, metric, cell)
    assert saved["seeds"] == 2 and saved["layouts"] == 8
    assert (out / "study.png").stat().st_size > 1000 and (out / "study_differences.png").stat().st_size > 1000
    table = (out / "study.md").read_text()  # the same numbers as Markdown tables
    cell = saved["comparisons"]["cyclerl_vs_sft_continued"]["cycle_miou_ref"]
    # A quick study's grounders cannot tell a drawing from a painted box: CycleRL's rows are marked, DJO's are not.
    assert saved["reward_gate"]["passed"] is False and saved["reward_gate"]["reasons"]
    assert saved["comparisons"]["cyclerl_vs_sft_continued"]["evidence"] is False
    assert saved["comparisons"]["djo_vs_pmtp_continued"]["evidence"] is True
    label = "`cyclerl_vs_sft_continued` (no evidence: reward gate failed)"
    assert f"| {label} | {cell['diff']:+.3f} [{cell['ci_low']:+.3f}, {cell['ci_high']:+.3f}]" in table
    assert "Reward gate (the djo grounder, correct - filled >= 0.15): failed" in table
    # Each arm of each seed trained from the shipped config, with the study's changes recorded.
    assert saved["settings"]["cyclerl_shuffled/seed1"]["reward_funcs"] == [
        "echogen_rl.rewards.controls:shuffled_cycle_iou",
        "echogen_rl.rewards.controls:shuffled_grounding_format",
    ]
    assert saved["settings"]["pmtp_continued/seed0"]["learning_rate"] == 2.0e-4  # DJO's restart, from its config
    assert saved["configs"]["djo"] == "recipes/configs/djo/shapes_tiny.yaml"  # repository-relative, no machine path
    # The output folder lies outside the working directory: the file names it by its role, not by its path.
    assert str(out) not in (out / "study.json").read_text() and str(out) not in table
    assert saved["settings"]["djo/seed0"]["output_dir"] == "<output_dir>/seed0/djo"
    # The reward check of the grounders that give rewards: PMTP's (once) and DJO's (per seed).
    assert set(saved["reward_check"]) == {"pmtp", "djo"}
    assert saved["reward_check"]["djo"]["correct_minus_filled"]["seeds"] == 2
    assert set(DRAWINGS) <= set(saved["reward_check"]["pmtp"])
    # PMTP scored as an arm is its own reference: one grounding serves both cycle columns.
    pmtp = json.loads((out / "pmtp" / "study_scores_held_out.json").read_text())
    for mode in ("_t1", "_greedy"):
        assert pmtp[mode]["scores"]["cycle_miou_policy"] == pmtp[mode]["scores"]["cycle_miou_ref"]
    # Each run followed the pool's thread share (one or two threads on this budget).
    run = json.loads((out / "seed0" / "djo" / "study_run.json").read_text())
    assert run["threads"] and set(run["threads"]) <= {1, 2}


def test_ap_intervals_run_as_jobs_agree_with_intervals_run_here(quick_study):
    out, report = quick_study  # its AP intervals ran in a pool of workers
    budget = StudyBudget.quick()
    targets, _ = study_layouts("held_out", budget.layouts, budget.shapes())
    evals = {"pmtp": [json.loads(scores_path(out / "pmtp", "held_out").read_text())]}
    for arm in budget.arms():
        evals[arm] = [json.loads(scores_path(out / f"seed{s}" / arm, "held_out").read_text()) for s in range(2)]
    here = summarize(evals, targets, budget, workers=1)
    for name, metrics in here["comparisons"].items():
        for metric in ("ap", "ap50", "ap_greedy", "ap50_greedy"):
            assert metrics[metric] == report["comparisons"][name][metric], (name, metric)


def test_arms_differ_and_the_study_resumes_without_retraining(quick_study, caplog):
    out, report = quick_study
    cyclerl = (out / "seed0" / "cyclerl" / "adapter_model.safetensors").read_bytes()
    sft = (out / "seed0" / "sft_continued" / "adapter_model.safetensors").read_bytes()
    assert cyclerl != sft  # the SFT control trained its own adapter
    # The shuffled control logged its own rewards. (After 4 PMTP steps no answer parses, every reward is 0 and
    # neither GRPO run moves its adapter, so their weights cannot be told apart at this budget.)
    logged = json.loads((out / "seed0" / "cyclerl_shuffled" / "study_run.json").read_text())["log_history"]
    assert any("rewards/shuffled_cycle_iou/mean" in h for h in logged)
    logged = json.loads((out / "seed0" / "cyclerl" / "study_run.json").read_text())["log_history"]
    assert any("rewards/cycle_iou/mean" in h for h in logged)
    stamp = (out / "seed1" / "djo" / "study_run.json").stat().st_mtime
    with caplog.at_level(logging.INFO, logger="echogen_rl.experiments.study"):
        again = run_study(out, StudyBudget.quick())
    assert (out / "seed1" / "djo" / "study_run.json").stat().st_mtime == stamp
    assert "done before, kept" in caplog.text
    assert again["comparisons"] == report["comparisons"]


def test_a_validation_study_reuses_the_runs_and_keeps_the_held_out_report(quick_study):
    out, report = quick_study
    held_out = (out / "study.json").read_text()
    runs = sorted(out.glob("**/study_run.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs} | {
        p: p.stat().st_mtime_ns for p in out.glob("**/model.safetensors")
    }
    # In-process: the fixture ran the pool.
    validation = run_study(out, StudyBudget.quick(), split="validation", workers=1)
    assert len(runs) >= 11 and {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was trained again
    assert (out / "study.json").read_text() == held_out
    assert json.loads((out / "study_validation.json").read_text())["split"] == "validation"
    # Other layouts, the same trained runs: scores differ, the settings do not.
    assert validation["settings"] == report["settings"]
    assert validation["arms"]["pmtp"]["cycle_miou_ref"] != report["arms"]["pmtp"]["cycle_miou_ref"] or (
        validation["arms"]["pmtp"]["tolerant_l2i"] != report["arms"]["pmtp"]["tolerant_l2i"]
    )


def test_a_study_needs_two_seeds(tmp_path):
    with pytest.raises(ValueError, match="at least 2 training seeds"):
        run_study(tmp_path, StudyBudget.quick(), seeds=1)


def test_a_study_of_another_world_compares_only_the_stages_asked(tmp_path):
    quick = StudyBudget.quick()
    budget = StudyBudget(**{**quick.__dict__, "world": {"grid_size": 12, "max_shapes": 4}, "stages": ("djo",)})
    report = run_study(tmp_path, budget, workers=1)
    # The runs drew the 12 x 12 world, from a tiny checkpoint of that grid.
    assert json.loads((tmp_path / "tiny-janus" / "tiny_janus.json").read_text())["grid_size"] == 12
    assert report["settings"]["djo/seed1"]["shapes_grid_size"] == 12
    assert report["settings"]["pmtp_continued/seed0"]["shapes_max_shapes"] == 4
    scores = json.loads((tmp_path / "seed0" / "djo" / "study_scores_held_out.json").read_text())
    assert {len(row) for row in scores["_greedy"]["codes"]} == {144}
    assert report["world"]["grid_size"] == 12
    assert set(report["comparisons"]) == {"djo_vs_pmtp_continued", "djo_vs_pmtp"}
    assert not (tmp_path / "seed0" / "cyclerl").exists()


def test_a_study_refuses_a_world_or_stage_it_cannot_run():
    with pytest.raises(ValueError, match="only grid_size and max_shapes"):
        StudyBudget(world={"patch_size": 8})
    with pytest.raises(ValueError, match="max_shapes"):
        StudyBudget(world={"max_shapes": 99})
    with pytest.raises(ValueError, match="stages"):
        StudyBudget(stages=("pmtp",))


def oracle_grounder(codes, phrases):
    """A grounder that reads the image exactly (`detect_from_codes`): a blob is no circle."""
    results = []
    for row, asked in zip(codes.tolist(), phrases):
        found = [e for e in detect_from_codes(row).entities if e.phrase in asked]
        results.append(GroundingResult(Layout(found)))
    return results


def test_reward_check_ranks_a_correct_drawing_above_filled_boxes_above_an_empty_image():
    targets = [Layout.from_json(t) for t in build_shapes_dataset(64, seed=3)["layout"]]
    filled = render_filled_boxes(targets[0])
    assert sum(c > 0 for c in filled) >= sum(c > 0 for c in render_codes(targets[0]))
    check = {k: np.array(v, dtype=float) for k, v in reward_check(oracle_grounder, targets, ShapesConfig()).items()}
    assert np.all(check["correct"] == 1.0) and np.all(check["empty"] == 0.0)
    # A filled box is a square or rectangle: only circles and triangles lose their reward.
    round_kinds = np.array([any(p.split()[1] in ("circle", "triangle") for p in t.phrases) for t in targets])
    assert round_kinds.any() and not round_kinds.all()
    assert np.all(check["filled"][round_kinds] < 1.0) and np.all(check["filled"][~round_kinds] == 1.0)
    assert check["correct"].mean() > check["filled"].mean() > check["empty"].mean()


def test_the_study_command_passes_the_world_and_stages_to_the_budget(monkeypatch, tmp_path, capsys):
    from echogen_rl import cli
    from echogen_rl.experiments import study, study_report

    seen = {}
    monkeypatch.setattr(study, "run_study", lambda out, budget, **kwargs: seen.update(budget=budget, **kwargs))
    monkeypatch.setattr(study_report, "format_results", lambda report, out: "")  # no study ran: nothing to print
    argv = ["study", "--quick", "--output-dir", str(tmp_path), "--grid-size", "12", "--max-shapes", "4"]
    assert cli.main([*argv, "--stages", "djo", "--jobs", "1"]) == 0
    assert seen["budget"].world == {"grid_size": 12, "max_shapes": 4}
    assert seen["budget"].stages == ("djo",)
    assert seen["budget"].shapes().grid_size == 12
    assert seen["budget"].layouts == StudyBudget.quick().layouts and seen["workers"] == 1
    assert cli.main(["study", "--quick", "--output-dir", str(tmp_path)]) == 0
    assert seen["budget"].world == {} and seen["budget"].stages == ("djo", "cyclerl")
    seen.clear()
    assert cli.main(["study", "--quick", "--output-dir", str(tmp_path), "--max-shapes", "99"]) == 2
    assert "echogen-rl study: error: ShapesConfig.max_shapes (99)" in capsys.readouterr().err
    assert not seen  # refused before any run
    assert cli.main(["study", "--quick", "--output-dir", str(tmp_path), "--grid-size", "0"]) == 2
    assert "grid_size" in capsys.readouterr().err and not seen


class CountingGrounder:
    """The oracle grounder of `model`, counting its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, codes, phrases):
        self.calls += 1
        return oracle_grounder(codes, phrases)


def test_scoring_grounds_once_when_the_scored_model_is_the_reference():
    config = ShapesConfig()
    targets, codes = study_layouts("held_out", 6, config)
    model, other = object(), object()
    policy, reference = CountingGrounder(model), CountingGrounder(model)
    same = score_codes(codes, targets, policy, reference, config)["scores"]
    assert (policy.calls, reference.calls) == (0, 1) and same["cycle_miou_policy"] == same["cycle_miou_ref"]
    policy, reference = CountingGrounder(other), CountingGrounder(model)
    apart = score_codes(codes, targets, policy, reference, config)["scores"]
    assert policy.calls == reference.calls == 1 and apart["cycle_miou_policy"] == same["cycle_miou_ref"]


def test_a_claim_stands_only_when_every_seed_set_holds_it_and_its_reward_gate_passed():
    from echogen_rl.experiments.study_report import format_replication

    def report(low, evidence=True):
        cell = {"diff": low + 0.01, "ci_low": low, "ci_high": low + 0.02}
        rows = {"djo_vs_pmtp_continued": {"cycle_miou_ref": cell}}
        rows["cyclerl_vs_sft_continued"] = {"cycle_miou_ref": dict(cell), "evidence": evidence}
        return {"comparisons": rows}

    table = format_replication({"a": report(0.01), "b": report(-0.01)}, metrics=("cycle_miou_ref",))
    assert (
        "| `djo_vs_pmtp_continued` | cycle_miou_ref | +0.020 [+0.010, +0.030] | +0.000 [-0.010, +0.010] | no |"
        in table
    )
    table = format_replication({"a": report(0.01), "b": report(0.02, evidence=False)}, metrics=("cycle_miou_ref",))
    assert (
        "| `djo_vs_pmtp_continued` | cycle_miou_ref | +0.020 [+0.010, +0.030] | +0.030 [+0.020, +0.040] | yes |"
        in table
    )
    assert "| `cyclerl_vs_sft_continued` | cycle_miou_ref | " in table and "no evidence (reward gate) |" in table
    assert "cyclerl_vs_shuffled_reward" not in table  # a comparison a set lacks is left out
    one = format_replication({"a": report(0.01)}, metrics=("cycle_miou_ref",))  # nothing replicates it yet
    assert "| `djo_vs_pmtp_continued` | cycle_miou_ref | +0.020 [+0.010, +0.030] | not yet (one set) |" in one
    assert format_replication({}) == "No seed set has run yet.\n"


def test_cyclerl_validation_links_the_shared_runs_and_retrains_only_what_the_change_touches(
    quick_study, tmp_path, monkeypatch, benchmark_script
):
    out, _ = quick_study
    if not (out / "study_validation.json").exists():
        run_study(out, StudyBudget.quick(), split="validation", workers=1)
    script = benchmark_script("cyclerl_validation")
    new = tmp_path / "beta"
    monkeypatch.setattr(
        "sys.argv", ["cyclerl_validation", "--from-study", str(out), "--out-dir", str(new), "beta=0.1"]
    )
    script.main()
    report = json.loads((new / "study_validation.json").read_text())
    # DJO is not compared but scored: its grounder gives CycleRL's rewards, and the gate checks it.
    assert report["split"] == "validation"
    assert set(report["arms"]) == {"pmtp", "djo", "cyclerl", "sft_continued", "cyclerl_shuffled"}
    assert "djo" in report["reward_check"] and "not scored" not in " ".join(report["reward_gate"]["reasons"])
    assert "djo_vs_pmtp_continued" not in report["comparisons"] and "cyclerl_vs_djo" in report["comparisons"]
    for run in ("pmtp", "seed0/djo", "seed1/sft_continued"):  # linked: the very same files
        assert (new / run / "study_run.json").samefile(out / run / "study_run.json")
    for run in ("seed0/cyclerl", "seed1/cyclerl_shuffled"):  # trained again, with the change
        assert not (new / run / "study_run.json").samefile(out / run / "study_run.json")
        assert json.loads((new / run / "study_run.json").read_text())["settings"]["beta"] == 0.1
    assert json.loads((new / "changes.json").read_text())["changes"] == {"beta": 0.1}
    # A change SFT continued shares retrains the control too; only a validation study is a source.
    assert "seed0/sft_continued" not in script.linked_runs(StudyBudget.quick(), {"max_steps": 3})
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    (held_out / "study.json").write_text((out / "study.json").read_text())
    monkeypatch.setattr(
        "sys.argv", ["cyclerl_validation", "--from-study", str(held_out), "--out-dir", str(new), "beta=1"]
    )
    with pytest.raises(FileNotFoundError, match="--split validation"):
        script.main()


def test_learnability_compares_each_cycle_run_with_the_shipped_one_window_by_window(benchmark_script):
    script = benchmark_script("cyclerl_learnability")
    assert script.variants(0.4, [0.0, 0.04]) == {
        "background_beta0.4": ("background", 0.4),
        "background_beta0": ("background", 0.0),
        "cycle_beta0.4": ("cycle", 0.4),
        "cycle_beta0": ("cycle", 0.0),
        "cycle_beta0.04": ("cycle", 0.04),
    }
    assert list(script.variants(0.0, [0.0])) == ["background_beta0", "cycle_beta0"]

    def record(rewards):
        log = [{"step": 10 * (i + 1), "reward": r, "kl": 0.01, "monitor/strict50": 0.5} for i, r in enumerate(rewards)]
        return {"log_history": [*log, {"train_runtime": 1.0}]}

    runs = {
        "cycle_beta0.4": script.windows(record([0.6, 0.7, 0.8])),
        "cycle_beta0": script.windows(record([0.7, 0.6, 0.9])),
        "background_beta0": script.windows(record([0.5, 1.0])),
    }
    assert runs["cycle_beta0"][2] == {
        "step": 30, "reward": 0.9, "kl": 0.01, "entropy": None, "strict50": 0.5, "filled_box_rate": None
    }  # fmt: skip
    summary = script.summarize(runs, "cycle_beta0.4")
    assert summary["cycle_beta0"]["reward_minus_shipped"] == pytest.approx((0.1 - 0.1 + 0.1) / 3)
    assert summary["cycle_beta0"]["windows_above_shipped"] == "2/3"
    assert "reward_minus_shipped" not in summary["cycle_beta0.4"]
    assert "reward_minus_shipped" not in summary["background_beta0"]  # other prompts and steps than the cycle runs
    assert (summary["background_beta0"]["first_reward"], summary["background_beta0"]["last_reward"]) == (0.5, 1.0)
    assert summary["cycle_beta0"]["mean_kl"] == pytest.approx(0.01)
    unlogged = script.windows({"log_history": [{"step": 10, "reward": 0.5}]})  # beta 0: TRL logs no KL
    assert script.summarize({"cycle_beta0": unlogged}, "cycle_beta0")["cycle_beta0"]["mean_kl"] is None
    with pytest.raises(ValueError, match="logged no reward"):
        script.windows({"log_history": [{"train_runtime": 1.0}]})


def test_signal_correlation_is_within_groups_and_skips_groups_without_spread(benchmark_script):
    script = benchmark_script("cyclerl_signal")
    # Within each group the reward rises with the score, while across groups it falls: only the first counts.
    reward = np.array([[0.1, 0.2, 0.3], [0.6, 0.7, 0.8], [0.5, 0.5, 0.5]])
    score = np.array([[0.7, 0.8, 0.9], [0.1, 0.2, 0.3], [0.0, 1.0, 0.5]])
    assert script.within_group_correlation(reward, score) == {"correlation": pytest.approx(1.0), "groups": 2, "of": 3}
    assert script.within_group_correlation(reward, -score)["correlation"] == pytest.approx(-1.0)
    assert script.within_group_correlation(reward[2:], score[2:])["groups"] == 0
