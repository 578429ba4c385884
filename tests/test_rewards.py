import math
import pickle
import sys

import pytest

from echogen_rl.layout import Entity, Layout
from echogen_rl.rewards import (
    REWARDS,
    RewardError,
    cycle_center,
    cycle_giou,
    cycle_iou,
    cycle_l1,
    get_cycle_reward,
    grounding_format,
    load_reward,
    load_rewards,
)

TARGET = Layout([Entity("red square", (0.0, 0.0, 0.5, 0.5)), Entity("blue circle", (0.5, 0.5, 1.0, 1.0))])


def _call(func, recovered, target=TARGET, **kw):
    return func(prompts=["p"], completions=["c"], target_layouts=[target], recovered_layouts=[recovered], **kw)[0]


def test_perfect_recovery_scores_one_everywhere():
    for func in (cycle_iou, cycle_giou, cycle_l1, cycle_center):
        assert _call(func, TARGET) == pytest.approx(1.0), func.__name__


def test_hand_computed_values():
    half = Layout([Entity("red square", (0.0, 0.0, 0.5, 0.25))])  # half of the first box, second missing
    assert _call(cycle_iou, half) == pytest.approx(0.25)
    assert _call(cycle_l1, half) == pytest.approx((1 - 0.25 / 4) / 2)
    assert _call(cycle_center, half) == pytest.approx((1 - 0.125 / math.sqrt(2)) / 2)
    # Disjoint boxes: IoU 0, GIoU negative (-(enclosing - union) / enclosing).
    far = Layout([Entity("red square", (0.5, 0.5, 1.0, 1.0)), Entity("blue circle", (0.0, 0.0, 0.5, 0.5))])
    assert _call(cycle_iou, far) == 0.0
    assert _call(cycle_giou, far) == pytest.approx(-0.5)
    assert _call(get_cycle_reward("iou", missing=-1.0), Layout([])) == -1.0


def test_matching_by_phrase_then_iou_and_empty_target():
    swapped = Layout([Entity("blue circle", (0.5, 0.5, 1.0, 1.0)), Entity("red square", (0.0, 0.0, 0.5, 0.5))])
    assert _call(cycle_iou, swapped) == pytest.approx(1.0)  # phrase, not position
    renamed = Layout([Entity("green thing", (0.0, 0.0, 0.5, 0.5))])
    assert _call(cycle_iou, renamed) == pytest.approx(0.5)  # Hungarian on IoU for an unmatched phrase
    assert _call(cycle_iou, TARGET, target=Layout([])) is None


def test_grounding_format_and_registry():
    assert grounding_format(["p", "q"], ["a", "b"], grounding_problems=[[], ["x"]]) == [1.0, 0.0]
    assert set(REWARDS) == {"cycle_iou", "cycle_giou", "cycle_l1", "cycle_center", "grounding_format"}
    assert [f.__name__ for f in load_rewards(["cycle_l1", "grounding_format"])] == ["cycle_l1", "grounding_format"]
    assert pickle.loads(pickle.dumps(load_reward("cycle_iou"))).__name__ == "cycle_iou"
    with pytest.raises(ValueError, match="unknown reward 'cycle_ioux'"):
        load_reward("cycle_ioux")


def test_custom_rewards_by_dotted_path_and_file(tmp_path, monkeypatch):
    source = (
        "def seen(prompts, completions, target_layouts, recovered_layouts, **kwargs):\n"
        "    return [float(len(t.entities) + 10 * len(r.entities)) for t, r in zip(target_layouts, recovered_layouts)]\n"
    )
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    recovered = Layout([Entity("red square", (0, 0, 1, 1))])
    for spec in ("my_rewards:seen", f"{tmp_path / 'my_rewards.py'}:seen"):
        reward = load_reward(spec)
        assert reward.__name__ == "seen"
        assert _call(reward, recovered) == 12.0
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="no file"):
        load_reward(str(tmp_path / "missing.py") + ":seen")


def test_failing_rewards_are_named():
    def boom(prompts, completions, **kwargs):
        raise KeyError("target")

    def nan(prompts, completions, **kwargs):
        return [float("nan")]

    def maybe(prompts, completions, **kwargs):
        return [None]

    with pytest.raises(RewardError, match="reward function 'boom' raised KeyError"):
        load_reward(boom)(["p"], ["c"])
    with pytest.raises(RewardError, match="'nan' returned NaN for completion 0"):
        load_reward(nan)(["p"], ["c"])
    assert load_reward(maybe)(["p"], ["c"]) == [None]  # None means "does not apply", as in TRL


def test_example_reward_in_recipes_reads_image_codes():
    reward = load_reward("rewards/custom_reward.py:box_fill")
    layout = Layout([Entity("red square", (0.0, 0.0, 0.5, 0.5))])
    full = [1 if (i // 8 < 4 and i % 8 < 4) else 0 for i in range(64)]
    out = reward(["p", "q"], ["c", "d"], target_layouts=[layout, layout], image_codes=[full, [0] * 64])
    assert out == [1.0, 0.0]


def test_shuffled_rewards_permute_within_the_batch_and_together():
    from echogen_rl.rewards.controls import ShuffledReward
    from echogen_rl.rewards.registry import load_reward

    def first(prompts, completions, **kwargs):
        return [0.1, None, 0.3, 0.4, 0.5, 0.6]

    def second(prompts, completions, **kwargs):
        return [1.0, None, 3.0, 4.0, 5.0, 6.0]

    a, b = ShuffledReward(first), ShuffledReward(second)
    seen = set()
    for _ in range(5):
        x, y = a(None, None), b(None, None)
        assert x[1] is None and sorted(v for v in x if v is not None) == [0.1, 0.3, 0.4, 0.5, 0.6]
        assert [round(v * 10, 6) for v in x if v is not None] == [
            v for v in y if v is not None
        ]  # the same permutation
        seen.add(tuple(x))
    assert len(seen) > 1  # a new permutation per batch
    assert load_reward("echogen_rl.rewards.controls:shuffled_cycle_iou").__name__ == "shuffled_cycle_iou"


def test_background_share_counts_background_codes():
    from echogen_rl.rewards.registry import load_reward

    reward = load_reward("echogen_rl.rewards.controls:background_share")
    codes = [[0, 0, 0, 0], [0, 3, 0, 5], [1, 2, 3, 4]]
    assert reward(prompts=[""] * 3, completions=[""] * 3, image_codes=codes) == [1.0, 0.5, 0.0]
