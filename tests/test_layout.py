import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from echogen_rl.layout import (
    LAYOUT_TAGS,
    Entity,
    Layout,
    LayoutError,
    box_area,
    boxes_from_coco_xywh,
    boxes_from_pixel_xyxy,
    center_distance,
    giou,
    iou,
    l1_distance,
    match_layouts,
    pairwise_iou,
    validate_layout,
)
from echogen_rl.layout_text import parse_layout

WORDS = ["red", "blue", "big", "square", "circle", "cat"]


@st.composite
def coords(draw):
    """Two coordinates that stay strictly ordered after quantization to the 1/1000 grid."""
    lo = draw(st.integers(0, 999))
    hi = draw(st.integers(lo + 1, 1000))
    jitter = st.floats(-0.49, 0.49)
    return min(1.0, max(0.0, (lo + draw(jitter)) / 1000)), min(1.0, max(0.0, (hi + draw(jitter)) / 1000))


@st.composite
def layouts(draw):
    entities = []
    for _ in range(draw(st.integers(0, 6))):
        phrase = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3)))
        (x1, x2), (y1, y2) = draw(coords()), draw(coords())
        entities.append(Entity(phrase, (x1, y1, x2, y2)))
    return Layout(entities)


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_text_round_trip_within_quantization(layout):
    parsed, problems = parse_layout(layout.to_text())
    assert problems == []
    assert parsed.phrases == layout.phrases
    for got, want in zip(parsed.boxes, layout.boxes):
        assert all(abs(g - w) <= 0.5 / 1000 + 1e-9 for g, w in zip(got, want))
    parsed.validate()


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_parser_never_raises_on_any_text(text):
    layout, problems = parse_layout(text)
    assert isinstance(layout, Layout) and isinstance(problems, list)
    assert all(isinstance(p, str) for p in problems)


FRAGMENTS = [*LAYOUT_TAGS, "< ref >", "</ REF>", "[", "]", ",", " ", "\n", "-", ".", "0", "7", "500", "1000", "1200"]
FRAGMENTS += ["red", "square", "<", ">", "/"]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=60))
def test_parser_never_raises_on_format_fragments(fragments):
    layout, problems = parse_layout("".join(fragments))
    assert isinstance(layout, Layout) and isinstance(problems, list)
    validate_layout(layout)  # whatever is recovered is valid


def test_parser_handles_non_str_and_empty_input():
    layout, problems = parse_layout(None)
    assert len(layout) == 0 and "str" in problems[0]
    assert parse_layout("") == (Layout([]), ["no layout tags found"])
    assert parse_layout("<grounding></grounding>") == (Layout([]), [])


def test_parser_handles_long_adversarial_input():
    """Inputs that made an earlier tag pattern backtrack for minutes; now each parses in linear time
    (speed belongs in benchmarks, so this test asserts the answers, and a regression shows as a hang)."""
    spaces = " " * 100_000
    adversarial = ["<" + spaces, "<" + spaces + "/" + spaces, "< / " * 50_000, "<ref>" * 50_000, "[1," * 50_000]
    for text in [*adversarial, "<box>[" + "9" * 100_000, "<ref>a</ref><box>[" + " ," * 50_000 + "]"]:
        layout, problems = parse_layout(text)
        assert len(layout) == 0 and problems, text[:20]


def test_parses_tokenizer_spaced_form():
    text = "<grounding> <ref>  red \n square </ref> <box> [ 100 , 200 , 500 , 600 ] </box> </grounding>"
    layout, problems = parse_layout(text, caption="a red square")
    assert problems == []
    assert layout == Layout([Entity("red square", (0.1, 0.2, 0.5, 0.6))], "a red square")


def test_parses_plangen_output_with_leading_caption():
    text = (
        "A cat beside a blue ball on the grass.\n<grounding><ref>cat</ref><box>[52, 310, 470, 905]</box>"
        "<ref>blue ball</ref><box>[530, 640, 760, 870]</box></grounding>"
    )
    layout, problems = parse_layout(text)
    assert problems == []
    assert layout.phrases == ["cat", "blue ball"]
    assert layout.boxes == [(0.052, 0.31, 0.47, 0.905), (0.53, 0.64, 0.76, 0.87)]


def test_parses_decimals_and_missing_wrapper_and_closing_tags():
    layout, problems = parse_layout("<ref>cat</ref><box>[100.5, 0, 250.25, 1000]")
    assert layout.entities == [Entity("cat", (0.1005, 0.0, 0.25025, 1.0))]
    assert problems == ["missing <grounding>", "entity 0: missing </box>", "missing </grounding>"]


def test_recovers_valid_entities_around_malformed_ones():
    text = (
        "<grounding>"
        "<ref>a</ref><box>[0, 0, 100, 100]</box>"
        "<ref>b</ref><box>[1, 2, 3]</box>"  # entity 1: 3 numbers
        "<ref>c</ref>"  # entity 2: ref without box
        "<ref>d</ref><box>[0, 0, 1200, 10]</box>"  # entity 3: out of range
        "<box>[0, 0, 10, 10]</box>"  # entity 4: box without ref
        "<ref>e</ref><box>[500, 0, 400, 10]</box>"  # entity 5: x2 <= x1
        "<ref>f</ref><box>[0, 50, 10, 50]</box>"  # entity 6: y2 <= y1
        "<ref>g</ref><box>[-5, 0, 10, 10]</box>"  # entity 7: negative
        "<ref>h</ref><box>[0, 0, ten, 10]</box>"  # entity 8: non-number
        "<ref> </ref><box>[0, 0, 10, 10]</box>"  # entity 9: empty phrase
        "<ref>i</ref><box>[200, 200, 300, 300]</box>"
        "</grounding> trailing words"
    )
    layout, problems = parse_layout(text)
    assert layout.phrases == ["a", "i"]
    assert layout.boxes == [(0.0, 0.0, 0.1, 0.1), (0.2, 0.2, 0.3, 0.3)]
    expected = [
        ("entity 1:", "3 numbers"),
        ("entity 2:", "<ref> without <box>"),
        ("entity 3:", "x2 = 1.2"),
        ("entity 4:", "<box> without <ref>"),
        ("entity 5:", "x2 <= x1"),
        ("entity 6:", "y2 <= y1"),
        ("entity 7:", "x1 = -0.005"),
        ("entity 8:", "non-number: 'ten'"),
        ("entity 9:", "'phrase' is empty"),
        ("unparsed trailing text", "trailing words"),
    ]
    assert len(problems) == len(expected)
    for problem, (prefix, detail) in zip(problems, expected):
        assert problem.startswith(prefix) and detail in problem, problem


def test_truncated_box_is_dropped_not_guessed():
    layout, problems = parse_layout("<grounding><ref>cat</ref><box>[100, 200, 500, 60")
    assert len(layout) == 0
    assert "entity 0: field 'box' is not wrapped in [ ]: '[100, 200, 500, 60'" in problems


@pytest.mark.parametrize(
    ("entity", "field", "value"),
    [
        (Entity("cat", (0.1, 0.2, 0.3)), "box", "(0.1, 0.2, 0.3)"),
        (Entity("cat", (0.1, float("nan"), 0.3, 0.4)), "box", "nan"),
        (Entity("cat", (0.1, 0.2, float("inf"), 0.4)), "box", "inf"),
        (Entity("cat", (0.1, 0.2, 1.5, 0.4)), "box", "1.5"),
        (Entity("cat", (-0.1, 0.2, 0.5, 0.4)), "box", "-0.1"),
        (Entity("cat", (0.5, 0.2, 0.5, 0.4)), "box", "x2 <= x1"),
        (Entity("cat", (0.1, 0.4, 0.5, 0.3)), "box", "y2 <= y1"),
        (Entity("cat", (0.1, 0.2, "0.5", 0.4)), "box", "'0.5'"),
        (Entity("  ", (0.1, 0.2, 0.5, 0.4)), "phrase", "'  '"),
        (Entity("a <box> cat", (0.1, 0.2, 0.5, 0.4)), "phrase", "<box>"),
    ],
)
def test_validate_layout_names_index_field_and_value(entity, field, value):
    layout = Layout([Entity("ok", (0.0, 0.0, 1.0, 1.0)), entity])
    with pytest.raises(LayoutError) as info:
        validate_layout(layout)
    message = str(info.value)
    assert message.startswith("entity 1:") and f"'{field}'" in message and value in message, message
    with pytest.raises(LayoutError):
        layout.validate()


def test_validate_layout_accepts_valid_layout():
    validate_layout(Layout([Entity("cat", (0.0, 0.0, 1.0, 1.0)), Entity("dog", (0.1, 0.2, 0.3, 0.4))]))


def test_geometry_hand_computed():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.6, 0.6, 0.8, 0.8]])
    assert torch.allclose(box_area(a), torch.tensor([0.25, 0.04]))
    # Overlap 0.25 x 0.25 = 0.0625, union 0.25 + 0.25 - 0.0625; the second pair is disjoint.
    assert torch.allclose(iou(a, b), torch.tensor([0.0625 / 0.4375, 0.0]))
    # GIoU = IoU - (hull - union) / hull: hulls are 0.75^2 and 0.8^2, the second union is 0.08.
    expected_giou = torch.tensor([0.0625 / 0.4375 - (0.5625 - 0.4375) / 0.5625, -(0.64 - 0.08) / 0.64])
    assert torch.allclose(giou(a, b), expected_giou)
    assert torch.allclose(l1_distance(a, b), torch.tensor([0.25, 0.6]))
    assert torch.allclose(center_distance(a, b), torch.tensor([0.25 * math.sqrt(2), 0.6 * math.sqrt(2)]))
    assert torch.allclose(giou(a, a), torch.ones(2)) and torch.allclose(iou(a, a), torch.ones(2))
    far = torch.tensor([[0.0, 0.0, 0.0001, 0.0001]]), torch.tensor([[0.9999, 0.9999, 1.0, 1.0]])
    assert -1 <= giou(*far).item() < -0.99


def test_pairwise_iou_agrees_with_elementwise():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(2, 5, 2, 2, generator=generator).sort(dim=2).values  # sorted per axis: x1 < x2, y1 < y2
    a, b = (c.transpose(1, 2).reshape(5, 4) for c in corners)
    pairwise = pairwise_iou(a, b)
    assert pairwise.shape == (5, 5)
    assert torch.allclose(pairwise.diagonal(), iou(a, b))
    assert torch.allclose(pairwise_iou(a, b[:3]), pairwise[:, :3])


def test_no_nan_on_degenerate_boxes():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.6]], requires_grad=True)
    for fn in (iou, giou, l1_distance, center_distance):
        value = fn(point, point.detach().clone())
        value.sum().backward()
        assert not value.isnan().any() and not point.grad.isnan().any(), fn.__name__
        point.grad = None
    assert not pairwise_iou(point, point).isnan().any()


def _layout(*entities):
    return Layout([Entity(phrase, box) for phrase, box in entities])


def test_match_by_phrase_in_order():
    target = _layout(("cat", (0.0, 0.0, 0.1, 0.1)), ("dog", (0.5, 0.5, 0.6, 0.6)), ("cat", (0.2, 0.2, 0.3, 0.3)))
    # Phrase matching ignores case, spacing and boxes: the k-th "cat" matches the k-th "cat".
    pred = _layout(("Dog", (0.9, 0.9, 1.0, 1.0)), (" cat ", (0.2, 0.2, 0.3, 0.3)), ("CAT", (0.0, 0.0, 0.1, 0.1)))
    assert match_layouts(pred, target) == [1, 0, 2]


def test_match_falls_back_to_hungarian_iou_for_renamed_phrases():
    target = _layout(("cat", (0.0, 0.0, 0.4, 0.4)), ("dog", (0.5, 0.5, 0.9, 0.9)), ("bird", (0.0, 0.6, 0.1, 0.7)))
    pred = _layout(
        ("puppy", (0.5, 0.5, 0.8, 0.8)),  # overlaps "dog" and "kitten" overlaps "cat": renamed phrases
        ("kitten", (0.0, 0.0, 0.3, 0.3)),
        ("bird", (0.0, 0.6, 0.1, 0.7)),
        ("tree", (0.6, 0.0, 0.7, 0.1)),  # overlaps nothing: stays unmatched
    )
    assert match_layouts(pred, target) == [1, 0, 2]


def test_match_leaves_unmatched_targets_none():
    target = _layout(("cat", (0.0, 0.0, 0.4, 0.4)), ("dog", (0.5, 0.5, 0.9, 0.9)))
    pred = _layout(("tree", (0.6, 0.0, 0.7, 0.1)))
    assert match_layouts(pred, target) == [None, None]
    assert match_layouts(Layout([]), target) == [None, None]
    assert match_layouts(target, Layout([])) == []


def test_hungarian_maximizes_total_iou():
    # Taking the best box for each target in turn would give pred 0 to target 0 (IoU 0.375 against 0.22), leaving
    # target 1 nothing that overlaps; the assignment instead pairs both (0.22 + 0.5).
    target = _layout(("a", (0.1, 0.0, 0.8, 1.0)), ("b", (0.0, 0.0, 0.2, 1.0)))
    pred = _layout(("x", (0.0, 0.0, 0.4, 1.0)), ("y", (0.6, 0.0, 1.0, 1.0)))
    assert match_layouts(pred, target) == [1, 0]


def test_conversions_from_pixels():
    assert boxes_from_coco_xywh((10, 20, 30, 40), 100, 200) == pytest.approx((0.1, 0.1, 0.4, 0.3))
    assert boxes_from_pixel_xyxy((10, 20, 40, 60), 100, 200) == pytest.approx((0.1, 0.1, 0.4, 0.3))
    assert boxes_from_coco_xywh((-5, 190, 110, 20), 100, 200) == (0.0, 0.95, 1.0, 1.0)  # clipped
    for width, height, bad in [(0, 10, "0"), (10, -2, "-2"), (float("nan"), 10, "nan")]:
        with pytest.raises(LayoutError, match=bad):
            boxes_from_pixel_xyxy((1, 1, 2, 2), width, height)
    with pytest.raises(LayoutError, match="height"):
        boxes_from_coco_xywh((1, 1, 2, 2), 10, 0)
