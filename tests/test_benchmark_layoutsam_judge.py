"""LayoutSAM-Eval judging: strict answer parsing, scores and crops against a scripted judge, and `HFJudge` end to
end on a tiny random Janus checkpoint."""

import pytest
import torch
from PIL import Image

from echogen_rl.eval.benchmarks.layoutsam_judge import QUESTIONS, HFJudge, judge_layoutsam, parse_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        (" yes.", "yes"),
        ("YES\n", "yes"),
        ('"Yes".', "yes"),
        ("\u201cyes\u201d", "yes"),
        ('"No"', "no"),
        ("No!", "no"),
        ("no", "no"),
        ("Yes, it is", "neither"),
        ("Yes No", "neither"),
        ("yess", "neither"),
        ("maybe", "neither"),
        ("", "neither"),
        ("...", "neither"),
    ],
)
def test_parse_answer_is_strict(text, expected):
    assert parse_answer(text) == expected


def test_questions_are_creatilayouts_word_for_word():
    spatial = QUESTIONS["spatial"].format(description="a cat")
    assert spatial == (
        'Is the subject "a cat" present in the image? Strictly answer with "Yes" or "No", without any irrelevant words.'
    )
    texture = QUESTIONS["texture"].format(description="a cat", detail="a fluffy cat")
    assert texture == (
        'Is the subject in "a cat" in the image consistent with the texture described in the detailed description: '
        '"a fluffy cat"? Strictly answer with "Yes" or "No", without any irrelevant words. If the texture is not '
        'mentioned in the detailed description, the answer is "Yes".'
    )


class ScriptedJudge:
    """Answers from a table keyed by (question kind, description); records what it was asked and, for each
    description, the crop's size and top-left pixel (the fixture images store x, y in their red, green values)."""

    def __init__(self, table: dict[tuple[str, str], str], details: dict[str, str]):
        self.table = table
        self.kind_of = {QUESTIONS[kind].format(description=d, detail=details[d]): (kind, d) for kind, d in table}
        self.asked: list[tuple[str, str]] = []
        self.crops: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}

    def ask(self, image, question):
        kind, description = self.kind_of[question]  # a question not in the script fails the test here
        self.asked.append((kind, description))
        self.crops[description] = (image.size, image.getpixel((0, 0))[:2])
        return self.table[kind, description]


def coordinate_image(width: int, height: int) -> Image.Image:
    """An image whose pixel (x, y) is (x, y, 0): a crop's top-left pixel tells where it was cut."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x, y, 0) for y in range(height) for x in range(width)])
    return image


# Two images of different sizes, five boxes. "tree" is judged absent (its attributes must not be asked), "cat" gets
# an unclear spatial answer, "dog" an unclear color answer. 0.29 * 100 is 28.999..., truncated to 28.
RECORDS = [
    {
        "file_name": "a.png",
        "regions": [
            {"description": "red/car", "detail": "a shiny red/ car", "box": [0.1, 0.2, 0.55, 0.9]},
            {"description": "tree", "detail": "a tall green tree", "box": [0.29, 0.0, 0.6, 0.5]},
            {"description": "dog", "detail": "a brown dog", "box": [0.0, 0.5, 1.0, 1.0]},
        ],
    },
    {
        "file_name": "b.png",
        "regions": [
            {"description": "cat", "detail": "a grey cat", "box": [0.25, 0.25, 0.75, 0.75]},
            {"description": "lamp", "detail": "a round lamp", "box": [0.5, 0.1, 0.9, 0.35]},
        ],
    },
]
SIZES = {"a.png": (100, 50), "b.png": (80, 120)}
# The captions as the judge must see them, "/" dropped.
DETAILS = {
    "redcar": "a shiny red car",
    "tree": "a tall green tree",
    "dog": "a brown dog",
    "cat": "a grey cat",
    "lamp": "a round lamp",
}
SCRIPT = {
    ("spatial", "redcar"): "Yes",
    ("color", "redcar"): "yes",
    ("texture", "redcar"): "No.",
    ("shape", "redcar"): "no",
    ("spatial", "tree"): "No",
    ("spatial", "dog"): ' "Yes" ',
    ("color", "dog"): "Yes, it is",
    ("texture", "dog"): "yes",
    ("shape", "dog"): "No!",
    ("spatial", "cat"): "maybe",
    ("spatial", "lamp"): "YES",
    ("color", "lamp"): "Yes.",
    ("texture", "lamp"): "no",
    ("shape", "lamp"): "no",
}


@pytest.fixture
def image_dir(tmp_path):
    for name, size in SIZES.items():
        coordinate_image(*size).save(tmp_path / name)
    return tmp_path


def test_scores_answers_and_crops_match_hand_computed(image_dir):
    judge = ScriptedJudge(SCRIPT, DETAILS)
    result = judge_layoutsam(judge, RECORDS, image_dir, progress=False)

    # yes of 5 boxes: spatial car, dog, lamp; color car, lamp; texture dog; shape none.
    assert result["boxes"] == 5
    assert result["spatial"] == pytest.approx(60.0)
    assert result["color"] == pytest.approx(40.0)
    assert result["texture"] == pytest.approx(20.0)
    assert result["shape"] == pytest.approx(0.0)
    assert result["overall"] == pytest.approx(30.0)
    assert result["answers"] == {
        "spatial": {"yes": 3, "no": 1, "neither": 1},
        "color": {"yes": 2, "no": 0, "neither": 1},
        "texture": {"yes": 1, "no": 2, "neither": 0},
        "shape": {"yes": 0, "no": 3, "neither": 0},
    }
    assert result["per_image"] == {
        "a.png": {"boxes": 3, "spatial": 2, "color": 1, "texture": 1, "shape": 0},
        "b.png": {"boxes": 2, "spatial": 1, "color": 1, "texture": 0, "shape": 0},
    }
    # Every scripted question was asked exactly once, and nothing about the absent tree or the unclear cat.
    assert sorted(judge.asked) == sorted(SCRIPT)
    # Crops as (size, top-left pixel), from each image's own size: a.png is 100x50, b.png 80x120.
    assert judge.crops == {
        "redcar": ((45, 35), (10, 10)),
        "tree": ((32, 25), (28, 0)),
        "dog": ((100, 25), (0, 25)),
        "cat": ((40, 60), (20, 30)),
        "lamp": ((32, 30), (40, 12)),
    }


def test_no_boxes_gives_no_scores(image_dir):
    result = judge_layoutsam(ScriptedJudge({}, {}), [{"file_name": "a.png", "regions": []}], image_dir, progress=False)
    assert result["boxes"] == 0
    assert all(result[kind] is None for kind in ("spatial", "color", "texture", "shape", "overall"))
    assert result["per_image"] == {"a.png": {"boxes": 0, "spatial": 0, "color": 0, "texture": 0, "shape": 0}}


def test_missing_image_names_file_and_record(image_dir):
    (image_dir / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"record 1: generated image b\.png not found"):
        judge_layoutsam(ScriptedJudge(SCRIPT, DETAILS), RECORDS, image_dir, progress=False)


def test_box_without_pixels_names_file_and_region(image_dir):
    # 0.5 * 100 and 0.505 * 100 both truncate to 50: no column left to crop.
    records = [{"file_name": "a.png", "regions": [*RECORDS[0]["regions"][:1], {**RECORDS[0]["regions"][1]}]}]
    records[0]["regions"][1]["box"] = [0.5, 0.1, 0.505, 0.5]
    with pytest.raises(ValueError, match=r"a\.png\) region 1: .* covers 0x20 pixels of the 100x50 image"):
        judge_layoutsam(ScriptedJudge(SCRIPT, DETAILS), records, image_dir, progress=False)


def test_chat_models_are_asked_greedily_through_chat():
    class ChatModel:
        def chat(self, **kwargs):
            self.kwargs = kwargs
            return "Yes"

    model, tokenizer, crop = ChatModel(), object(), Image.new("RGB", (4, 4))
    assert HFJudge(model, tokenizer, max_new_tokens=5).ask(crop, "Is it?") == "Yes"
    assert model.kwargs["image"] is None
    assert model.kwargs["msgs"] == [{"role": "user", "content": [crop, "Is it?"]}]
    assert model.kwargs["tokenizer"] is tokenizer
    assert model.kwargs["sampling"] is False
    assert model.kwargs["max_new_tokens"] == 5


@pytest.mark.parametrize("make", [lambda tmp: tmp / "absent", lambda tmp: tmp / "weights.bin"])
def test_judge_loads_only_from_a_local_folder(tmp_path, make):
    (tmp_path / "weights.bin").write_bytes(b"")
    path = make(tmp_path)
    with pytest.raises(FileNotFoundError, match="local folder") as err:
        HFJudge.from_pretrained(path)
    assert str(path) in str(err.value)


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory):
    """The tiny Janus checkpoint with a `JanusProcessor` and a chat template, set to sample by default: only a
    judge that forces greedy decoding answers the same question twice the same way."""
    from transformers import GenerationConfig

    from echogen_rl.eval.benchmarks.samples import write_sample_judge

    path = write_sample_judge(tmp_path_factory.mktemp("judge") / "tiny-janus")
    generation = GenerationConfig.from_pretrained(path)
    generation.do_sample, generation.temperature = True, 1.0
    generation.save_pretrained(path)
    return path


def test_hf_judge_end_to_end_on_a_tiny_model(tiny_judge_dir, image_dir):
    judge = HFJudge.from_pretrained(tiny_judge_dir, device="cpu")
    crop = coordinate_image(20, 13)
    question = QUESTIONS["spatial"].format(description="red circle")

    # The checkpoint samples by default: left to it, two answers differ, so equal answers below mean greedy.
    inputs = judge.processor(text=f"<|User|>: <image_placeholder>{question}\n\n<|Assistant|>:", images=[crop])
    torch.manual_seed(0)
    sampled = [judge.model.generate(**inputs, max_new_tokens=8)[0].tolist() for _ in range(2)]
    assert sampled[0] != sampled[1]

    answer = judge.ask(crop, question)
    assert isinstance(answer, str)
    assert judge.ask(crop, question) == answer

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def ask(self, image, question):
            self.calls += 1
            return self.inner.ask(image, question)

    counting = Counting(judge)
    result = judge_layoutsam(counting, RECORDS, image_dir, progress=False)
    answers = result["answers"]
    assert sum(sum(counts.values()) for counts in answers.values()) == counting.calls
    assert sum(answers["spatial"].values()) == result["boxes"] == 5
    for attribute in ("color", "texture", "shape"):
        assert sum(answers[attribute].values()) == answers["spatial"]["yes"]
