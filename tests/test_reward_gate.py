"""The cycle reward's judge must see shape and color: kind negatives, wrong-color drawings, the reward check's arithmetic, the gate, the monitor."""

import json

import numpy as np
import pytest
import torch

from echogen_rl.data.collators import PMTPCollator
from echogen_rl.data.kind_negatives import KindNegatives, draw_other_colors, draw_other_kinds, other_kind_masks
from echogen_rl.data.shapes import (
    ShapesConfig,
    build_shapes_dataset,
    detect_from_codes,
    render_codes,
    render_filled_boxes,
    shape_mask,
)
from echogen_rl.eval.metrics import filled_box_rate, strict_recall50
from echogen_rl.eval.reward_check import REWARD_GATE_MARGIN, reward_check, reward_gate, summarize_reward_check
from echogen_rl.experiments.study import run_study
from echogen_rl.layout import Layout, grounding_answer
from echogen_rl.models.grounding import GroundingResult
from echogen_rl.models.palette import COLOR_NAMES
from echogen_rl.models.prompts import PromptBuilder


@pytest.fixture(scope="module")
def shapes():
    data = build_shapes_dataset(96, seed=11)
    return [Layout.from_json(t) for t in data["layout"]], [list(c) for c in data["image_codes"]]


def test_other_kind_masks_never_hold_the_kind_itself():
    assert other_kind_masks("square", 2, 2) == []  # only a filled box fits: nothing else to draw
    circle = other_kind_masks("circle", 3, 3)
    assert any(m.all() for m in circle)  # the filled box
    assert not any(np.array_equal(m, shape_mask("circle", 3, 3)) for m in circle)
    assert any(np.array_equal(m, shape_mask("triangle", 3, 3)) for m in circle)
    # A filled box is a square's own drawing: never an alternative to it.
    assert not any(m.all() for m in other_kind_masks("square", 4, 4))


def test_draw_other_kinds_changes_every_entity_that_can_change(shapes):
    layouts, _ = shapes
    for layout in layouts[:32]:
        found = detect_from_codes(draw_other_kinds(layout)).phrases
        for e in layout.entities:
            kind, (w, h) = e.phrase.split()[1], (round(8 * (e.box[2] - e.box[0])), round(8 * (e.box[3] - e.box[1])))
            assert (e.phrase in found) == (not other_kind_masks(kind, w, h)), (layout.to_text(), found)


def test_draw_other_colors_keeps_kind_and_box_and_names_no_color_of_the_layout(shapes):
    layouts, _ = shapes
    for layout in layouts:
        found = detect_from_codes(draw_other_colors(layout)).entities
        used = {e.phrase.split()[0] for e in layout.entities}
        assert not used & {e.phrase.split()[0] for e in found}, layout.to_text()
        # Same kinds in the same boxes: only the colors moved (entities that share a new color may merge when
        # they touch, so compare the kinds drawn where no two of the layout's boxes touch).
        if len(found) == len(layout.entities):
            assert sorted((e.box, e.phrase.split()[1]) for e in found) == sorted(
                (e.box, e.phrase.split()[1]) for e in detect_from_codes(render_codes(layout)).entities
            )
    crowded = Layout([type(layouts[0].entities[0])(f"{c} square", (0.0, 0.0, 0.25, 0.25)) for c in COLOR_NAMES])
    with pytest.raises(ValueError, match="every color"):
        draw_other_colors(crowded)


def test_kind_negatives_redraw_one_entity_or_ask_another_kind(shapes):
    layouts, codes = shapes
    negatives = KindNegatives(1.0)
    redrawn = swapped = 0
    for i, (layout, grid) in enumerate(zip(layouts, codes)):
        made = negatives.apply(str(i), layout, grid)
        assert made == negatives.apply(str(i), layout, grid)  # fixed by the key, not drawn
        if made is None:
            continue
        shown, query, answer = made
        assert len(query) == len(layout)  # one phrase per entity, as a reward's query
        assert len({p.split()[0] for p in query}) == len(query)  # colors stay distinct: no shortcut by color
        text = grounding_answer(query, answer)
        assert text.count("[]") == 1  # exactly one phrase answered "not present"
        if shown != grid:
            redrawn += 1
            assert query == layout.phrases
            (gone,) = set(layout.phrases) - set(answer.phrases)
            entity = next(e for e in layout.entities if e.phrase == gone)
            x1, y1, x2, y2 = (round(8 * v) for v in entity.box)
            diff = np.argwhere(np.array(shown).reshape(8, 8) != np.array(grid).reshape(8, 8))
            assert all(y1 <= r < y2 and x1 <= c < x2 for r, c in diff)  # only its box changed
            assert gone not in detect_from_codes(shown).phrases  # the oracle no longer sees that kind there
        else:
            swapped += 1
            (k,) = [j for j, (a, b) in enumerate(zip(query, layout.phrases)) if a != b]
            assert query[k].split()[0] == layout.phrases[k].split()[0]  # same color, another kind
            assert query[k].split()[1] != layout.phrases[k].split()[1]
    assert redrawn > 10 and swapped > 10
    assert all(KindNegatives(0.0).apply(str(i), layouts[i], codes[i]) is None for i in range(20))
    with pytest.raises(ValueError, match="KindNegatives.prob"):
        KindNegatives(1.5)


def test_color_negatives_recolor_one_entity_or_ask_it_in_an_unnamed_color(shapes):
    layouts, codes = shapes
    negatives = KindNegatives(0.0, colors=1.0)
    recolored = asked = 0
    for i, (layout, grid) in enumerate(zip(layouts, codes)):
        made = negatives.apply(str(i), layout, grid)
        assert made is not None and made == negatives.apply(str(i), layout, grid)
        shown, query, answer = made
        named = {p.split()[0] for p in layout.phrases}
        assert len(query) == len(layout) and len({p.split()[0] for p in query}) == len(query)
        assert grounding_answer(query, answer).count("[]") == 1  # exactly one phrase answered "not present"
        if shown != grid:
            recolored += 1
            assert query == layout.phrases
            (gone,) = set(layout.phrases) - set(answer.phrases)
            found = detect_from_codes(shown).entities
            assert gone not in {e.phrase for e in found}
            (moved,) = [e for e in found if e.phrase.split()[0] not in named]  # the same kind, in a new color
            assert moved.phrase.split()[1] == gone.split()[1]
            assert moved.box == next(e.box for e in layout.entities if e.phrase == gone)
        else:
            asked += 1
            assert answer == layout
            (k,) = [j for j, (a, b) in enumerate(zip(query, layout.phrases)) if a != b]
            assert query[k].split()[1] == layout.phrases[k].split()[1]  # same kind, a color the image lacks
            assert query[k].split()[0] not in named
    assert recolored > 20 and asked > 20
    assert all(KindNegatives(0.0, colors=1.0, redraw=False).apply(str(i), t, c)[0] == c for i, (t, c) in
               enumerate(zip(layouts, codes)))  # fmt: skip
    # A kind negative is drawn as before: the colors share only takes examples the kind share left alone.
    for i, (layout, grid) in enumerate(zip(layouts, codes)):
        kind = KindNegatives(0.3).apply(str(i), layout, grid)
        both = KindNegatives(0.3, colors=0.5).apply(str(i), layout, grid)
        assert kind is None or both == kind
    with pytest.raises(ValueError, match="KindNegatives.colors"):
        KindNegatives(0.0, colors=-0.1)


def test_pmtp_collator_shows_the_negative_to_the_grounder_only(tiny_tokenizer, shapes):
    """The L2I segment keeps the true image as its target; only the I2L segment sees the redrawn one."""
    layouts, codes = shapes
    prompts = PromptBuilder(tiny_tokenizer, 64)
    collator = PMTPCollator(prompts, None, pack=False, kinds=KindNegatives(1.0))
    from echogen_rl.data.collators import _unit_hash

    checked = 0
    for layout, grid in zip(layouts, codes):
        example = {"caption": layout.caption, "layout": layout.to_json(), "image_codes": grid}
        made = KindNegatives(1.0).apply(str(_unit_hash(example)), layout, grid)
        if made is None or made[0] == grid:
            continue
        l2i, i2l = collator.segments(example, 0)
        assert [t for t in l2i.image_labels if t != -100] == grid
        assert [t for t, m in zip(i2l.input_ids, i2l.image_mask) if m] == made[0]
        checked += 1
    assert checked > 5


def oracle_grounder(codes, phrases):
    results = []
    for row, asked in zip(codes.tolist(), phrases):
        results.append(GroundingResult(Layout([e for e in detect_from_codes(row).entities if e.phrase in asked])))
    return results


def test_the_oracle_passes_the_reward_gate_and_a_box_or_place_reader_fails_it(shapes):
    layouts, _ = shapes
    config = ShapesConfig()

    def box_reader(codes, phrases):  # reads color and place only: any component of the phrase's color
        out = []
        for row, asked in zip(codes.tolist(), phrases):
            found = {e.phrase.split()[0]: e for e in detect_from_codes(row).entities}
            hits = [type(e)(p, e.box) for p in asked if (e := found.get(p.split()[0]))]
            out.append(GroundingResult(Layout(hits)))
        return out

    def place_reader(codes, phrases):  # reads kind and place, not color: the asked phrases in reading order
        out = []
        for row, asked in zip(codes.tolist(), phrases):
            found = detect_from_codes(row).entities
            hits = [type(e)(p, e.box) for p, e in zip(asked, found) if e.phrase.split()[1] == p.split()[1]]
            out.append(GroundingResult(Layout(hits)))
        return out

    for grounder, fails in ((oracle_grounder, ""), (box_reader, "correct - filled"), (place_reader, "other_color")):
        check = reward_check(grounder, layouts, config)
        summary = summarize_reward_check({"djo": [{"reward_check": check}] * 2}, 500)["djo"]
        assert set(summary) >= {"correct", "filled", "other_kind", "other_color", "empty", "correct_minus_filled"}
        gate = reward_gate(summary)
        assert gate["passed"] is not fails, gate
        assert not fails or any(fails in r for r in gate["reasons"]), gate
    assert set(reward_check(oracle_grounder, layouts[:4], config, drawings=["other_color"])) == {"other_color"}
    with pytest.raises(ValueError, match="unknown drawings.*'blob'"):
        reward_check(oracle_grounder, layouts[:4], config, drawings=["blob"])
    # The arithmetic: a hand-made check with known means.
    check = {
        "correct": [1.0, 0.5, None],
        "filled": [0.0, 0.5, None],
        "other_kind": [0.5, 0.5, None],
        "empty": [0.0] * 3,
    }
    summary = summarize_reward_check({"pmtp": [{"reward_check": check}]}, 200)["pmtp"]
    assert summary["correct"]["mean"] == pytest.approx(0.75)
    assert summary["correct_minus_filled"]["diff"] == pytest.approx(0.5)
    assert summary["correct_minus_other_kind"]["diff"] == pytest.approx(0.25)
    assert not reward_gate({})["passed"] and "not scored" in reward_gate({})["reasons"][0]  # no check is no pass
    near = {"correct_minus_filled": {"ci_low": REWARD_GATE_MARGIN - 0.01}}
    near.update({f"correct_minus_{d}": {"ci_low": 0.1} for d in ("other_kind", "empty")})
    near["correct_minus_other_color"] = {"ci_low": REWARD_GATE_MARGIN}
    assert [r.split(":")[0] for r in reward_gate(near)["reasons"]] == ["correct - filled"]
    near["correct_minus_other_color"] = {"ci_low": REWARD_GATE_MARGIN - 0.01}
    assert [r.split(":")[0] for r in reward_gate(near)["reasons"]] == ["correct - filled", "correct - other_color"]


def test_the_monitor_trips_on_painted_boxes_and_not_on_drawings(shapes):
    layouts, _ = shapes
    config = ShapesConfig()
    drawn = [detect_from_codes(render_codes(t, config)) for t in layouts]
    painted = [detect_from_codes(render_filled_boxes(t, config)) for t in layouts]
    round_ = [any(p.split()[1] in ("circle", "triangle") for p in t.phrases) for t in layouts]
    rate_drawn, rate_painted = filled_box_rate(drawn, layouts), filled_box_rate(painted, layouts)
    assert [r is not None for r in rate_drawn] == round_
    assert all(r == 0.0 for r in rate_drawn if r is not None)
    assert all(r == 1.0 for r in rate_painted if r is not None)
    assert all(s == 1.0 for s in strict_recall50(drawn, layouts))
    assert np.mean(strict_recall50(painted, layouts)) < 1.0


def test_cyclerl_logs_the_monitor_on_the_shapes_world(tiny_model, tiny_tokenizer, tmp_path):
    from echogen_rl.data.random_layouts import add_prompt_column
    from echogen_rl.trainer.cyclerl_config import CycleRLConfig
    from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer

    data = add_prompt_column(build_shapes_dataset(8, seed=2))
    args = CycleRLConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4, report_to=[],
        save_strategy="no", use_cpu=True, bf16=False, gradient_checkpointing=False, beta=0.0,
        grounding_model="policy", logging_steps=1, guidance_scale=1.0,
    )  # fmt: skip
    trainer = CycleRLTrainer(
        tiny_model,
        ["cycle_iou"],
        args,
        train_dataset=data,
        processing_class=tiny_tokenizer,
        shapes_world=ShapesConfig(),
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert 0.0 <= logged["monitor/filled_box_rate"] <= 1.0 and 0.0 <= logged["monitor/strict50"] <= 1.0
    with pytest.raises(ValueError, match="shapes_world: a 12x12 grid"):
        CycleRLTrainer(
            tiny_model, ["cycle_iou"], args, train_dataset=data, processing_class=tiny_tokenizer,
            shapes_world=ShapesConfig(grid_size=12),
        )  # fmt: skip


def test_a_seed_set_refuses_a_folder_of_another_set(tmp_path):
    (tmp_path / "pmtp").mkdir()
    (tmp_path / "pmtp" / "study_run.json").write_text(json.dumps({"settings": {"seed": 0}}))
    with pytest.raises(ValueError, match="another seed set"):
        run_study(tmp_path, seed_set="b")
    with pytest.raises(ValueError, match="seed_set"):
        run_study(tmp_path, seed_set="c")


def test_the_seed_sets_score_disjoint_layouts():
    from echogen_rl.data.splits import SEED_SETS
    from echogen_rl.experiments.study_scoring import study_layouts

    a, _ = study_layouts("held_out", 64, ShapesConfig(), "a")
    b, _ = study_layouts("held_out", 64, ShapesConfig(), "b")
    assert {t.to_text() for t in a}.isdisjoint({t.to_text() for t in b}) or len(
        {t.to_text() for t in a} & {t.to_text() for t in b}
    ) < 4  # independent streams; a tiny world repeats a few single-shape layouts by chance
    assert SEED_SETS["a"]["first_seed"] + 3 <= SEED_SETS["b"]["first_seed"]  # disjoint training seeds


def test_the_loop_collator_asks_other_kinds_but_never_redraws(tiny_tokenizer, shapes):
    from echogen_rl.data.collators import LoopLossCollator

    layouts, codes = shapes
    prompts = PromptBuilder(tiny_tokenizer, 64)
    with pytest.raises(ValueError, match="redraw=False"):
        LoopLossCollator(prompts, kinds=KindNegatives(1.0))
    examples = [{"caption": t.caption, "layout": t.to_json(), "image_codes": c} for t, c in zip(layouts, codes)][:16]
    plain = LoopLossCollator(prompts)(examples)
    asked = LoopLossCollator(prompts, kinds=KindNegatives(1.0, redraw=False))(examples)
    assert torch.equal(
        plain["i2l_input_ids"][plain["i2l_image_mask"]], asked["i2l_input_ids"][asked["i2l_image_mask"]]
    )
    assert torch.equal(plain["l2i_input_ids"], asked["l2i_input_ids"])
    assert not torch.equal(plain["i2l_text_labels"], asked["i2l_text_labels"])  # other queries, other answers


def test_a_resumed_study_scores_only_the_drawings_a_run_lacks(tiny_checkpoint, tmp_path, monkeypatch):
    from echogen_rl.eval import reward_check as check_module
    from echogen_rl.experiments import study_scoring

    run = tmp_path / "djo"
    run.mkdir()
    for f in tiny_checkpoint.iterdir():
        (run / f.name).symlink_to(f)
    kept = {"grounding_miou": [0.5] * 4, "marker": 1, "reward_check": {d: [0.25] * 4 for d in ("correct", "empty")}}
    study_scoring.scores_path(run, "validation").write_text(json.dumps(kept))
    assert not study_scoring.has_scores(run, "validation", 4, checks_rewards=True)
    assert study_scoring.has_scores(run, "validation", 4, checks_rewards=False)
    scored = []
    real = check_module.reward_check
    monkeypatch.setattr(study_scoring, "evaluate_model", lambda *a: pytest.fail("scored again"))
    monkeypatch.setattr(
        study_scoring, "reward_check", lambda *a, drawings: scored.append(drawings) or real(*a, drawings=drawings)
    )
    study_scoring.score_run(str(run), None, str(run), "validation", 4, True, {}, "a")
    assert scored == [["filled", "other_kind", "other_color"]]
    result = json.loads(study_scoring.scores_path(run, "validation").read_text())
    assert result["marker"] == 1 and result["reward_check"]["correct"] == [0.25] * 4
    assert all(len(result["reward_check"][d]) == 4 for d in ("filled", "other_kind", "other_color"))
    assert study_scoring.has_scores(run, "validation", 4, checks_rewards=True)


def test_shuffled_queries_ask_in_another_order_and_answer_in_it(tiny_tokenizer, shapes):
    from echogen_rl.data.collators import LoopLossCollator, shuffled_query

    layouts, codes = shapes
    prompts = PromptBuilder(tiny_tokenizer, 64)
    examples = [{"caption": t.caption, "layout": t.to_json(), "image_codes": c} for t, c in zip(layouts, codes)]
    plain = PMTPCollator(prompts, None, pack=False)
    shuffled = PMTPCollator(prompts, None, pack=False, shuffle_queries=True)
    moved = 0
    for i, (example, layout) in enumerate(zip(examples, layouts)):
        order = shuffled_query(example, layout.phrases)
        assert order == shuffled_query(example, layout.phrases) and sorted(order) == sorted(layout.phrases)
        moved += order != layout.phrases
        (l2i, i2l), (l2i_plain, _) = shuffled.segments(example, i), plain.segments(example, i)
        assert l2i.input_ids == l2i_plain.input_ids  # generation is untouched
        expected = prompts.i2l(example["image_codes"], layout, query=order)
        assert i2l.input_ids == expected.input_ids and i2l.text_labels == expected.text_labels
        answer = tiny_tokenizer.decode([t for t in i2l.text_labels if t != -100])
        assert all(p in answer for p in order)
        positions = [answer.index(p) for p in order]
        assert positions == sorted(positions)  # answered in the asked order
    assert moved > 30  # most multi-entity queries change order
    loop = LoopLossCollator(prompts, shuffle_queries=True)(examples[:8])
    expected = LoopLossCollator(prompts)(examples[:8])
    assert torch.equal(loop["l2i_input_ids"], expected["l2i_input_ids"])
    assert not torch.equal(loop["i2l_text_labels"], expected["i2l_text_labels"])


def test_box_hits_tell_a_grounder_that_reads_the_phrase_from_one_that_lists_shapes_in_order(shapes, benchmark_script):
    probe = benchmark_script("color_binding_probe")
    layouts, _ = shapes
    config = ShapesConfig()

    def lister(codes, phrases):  # the shapes in reading order, under the asked names in the asked order
        return [
            GroundingResult(Layout([type(e)(p, e.box) for p, e in zip(asked, detect_from_codes(row).entities)]))
            for row, asked in zip(codes.tolist(), phrases)
        ]

    read = probe.box_hits(oracle_grounder, layouts, config)
    listed = probe.box_hits(lister, layouts, config)
    assert len(read["boxes_on_some_shape"]) == sum(len(t.entities) > 1 for t in layouts) > 20
    assert np.mean(read["boxes_on_some_shape"]) == np.mean(read["boxes_on_asked_shape"]) == 1.0
    assert np.mean(listed["boxes_on_some_shape"]) == 1.0
    assert np.mean(listed["boxes_on_asked_shape"]) < 0.5  # asked in reverse, the middle shape alone is right
