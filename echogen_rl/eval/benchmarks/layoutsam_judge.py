"""LayoutSAM-Eval scored by a vision-language judge, as CreatiLayout defines it.

Every box of every layout is cropped out of the generated image and the judge (MiniCPM-V-2.6 in the original) is
asked whether the box's subject is present (`spatial`), and only then whether it matches the color, texture and
shape of the region's detailed caption. A score is the share of all boxes answered "yes", times 100.

Two departures from the original, both deliberate:

- Answers are parsed strictly ([`parse_answer`]): the original counts any answer that contains "Yes" or "yes"
  ("Yes, but no" included) as yes. Here only a bare yes is yes, a bare no is no, and everything else is counted as
  "neither" and scored as not yes, so the report shows how often the judge did not answer cleanly.
- Boxes are scaled by the generated image's own width and height instead of the generator's nominal resolution,
  so images of any size are cropped where the layout put the box.

    judge = HFJudge.from_pretrained("/models/MiniCPM-V-2_6")
    result = judge_layoutsam(judge, records, "outputs/images")
"""

from __future__ import annotations

import json
import logging
import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

logger = logging.getLogger(__name__)

ATTRIBUTES = ("color", "texture", "shape")
KINDS = ("spatial", *ATTRIBUTES)
ANSWERS = ("yes", "no", "neither")

# CreatiLayout's questions word for word; `{description}` is the short region caption, `{detail}` the detailed one.
QUESTIONS = {
    "spatial": (
        'Is the subject "{description}" present in the image? '
        'Strictly answer with "Yes" or "No", without any irrelevant words.'
    ),
    **{
        attribute: (
            f'Is the subject in "{{description}}" in the image consistent with the {attribute} described in the '
            f'detailed description: "{{detail}}"? Strictly answer with "Yes" or "No", without any irrelevant words. '
            f'If the {attribute} is not mentioned in the detailed description, the answer is "Yes".'
        )
        for attribute in ATTRIBUTES
    },
}

_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_TRAILING_PUNCTUATION = ".,;:!?"


def parse_answer(text: str) -> str:
    """Reads a judge's answer strictly.

    Whitespace and surrounding quotes are stripped, then trailing punctuation, and the rest is lowercased: exactly
    `yes` is "yes", exactly `no` is "no", anything else ("Yes, it is", "maybe", an empty answer) is "neither".

    Args:
        text (`str`): the judge's answer.

    Returns:
        `str`: one of "yes", "no", "neither".
    """
    core = text.strip(_QUOTES + string.whitespace).rstrip(_QUOTES + _TRAILING_PUNCTUATION + string.whitespace).lower()
    return core if core in ("yes", "no") else "neither"


class Judge(Protocol):
    """Anything that answers a question about an image: a local vision-language model ([`HFJudge`]), an API
    client, or a scripted stand-in in tests."""

    def ask(self, image: Image.Image, question: str) -> str: ...


class HFJudge:
    """A Hugging Face vision-language model as a [`Judge`], answering greedily so that scores are repeatable.

    A model with a `chat` method (MiniCPM-V's remote code) is asked through it, with `processor` being its
    tokenizer; any other model through `processor`'s chat template and `generate`. transformers' own
    image-text-to-text classes have no `chat` method, so the rule picks the model's own interface where it has one.

    Args:
        model (`torch.nn.Module`): the vision-language model, in eval mode on its device.
        processor (`ProcessorMixin` or `PreTrainedTokenizerBase`): its processor, or its tokenizer for a `chat`
            model.
        max_new_tokens (`int`, *optional*, defaults to `8`): longest answer; a clean answer is one word.
    """

    def __init__(self, model, processor, max_new_tokens: int = 8):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_new_tokens: int = 8,
    ) -> HFJudge:
        """Loads a judge from a local folder, never from the hub.

        A model whose `model_type` transformers maps to an image-text-to-text class (Llava, Qwen2-VL, Janus, ...) is
        loaded with `AutoModelForImageTextToText` and `AutoProcessor`, running no code from the folder. Any other
        (MiniCPM-V-2.6 is `minicpmv`, known to no transformers class) is loaded with `AutoModel` and
        `trust_remote_code=True`, which runs the Python files in the folder, and must have a `chat` method.

        Args:
            path (`str` or `os.PathLike`): the model folder, e.g. a downloaded MiniCPM-V-2.6.
            device (`str` or `torch.device`, *optional*): defaults to CUDA when available, else CPU.
            dtype (`torch.dtype`, *optional*): defaults to the dtype the checkpoint was saved in.
            max_new_tokens (`int`, *optional*, defaults to `8`): longest answer.

        Returns:
            [`HFJudge`]: the judge.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"judge model {path} is not a directory: the judge is loaded from a local folder only "
                "(e.g. a downloaded MiniCPM-V-2.6, or any transformers image-text-to-text model)"
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"judge model {path} has no config.json")
        model_type = json.loads(config_file.read_text()).get("model_type")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        load = {"local_files_only": True, "dtype": dtype or "auto"}
        if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            logger.info("Judge %s (%s): loaded as an image-text-to-text model", path, model_type)
            model = AutoModelForImageTextToText.from_pretrained(path, **load)
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        else:
            logger.info("Judge %s (%s): no transformers class, loaded with its own code", path, model_type)
            model = AutoModel.from_pretrained(path, trust_remote_code=True, **load)
            processor = AutoTokenizer.from_pretrained(path, trust_remote_code=True, local_files_only=True)
            if not callable(getattr(model, "chat", None)):
                raise ValueError(
                    f"judge model {path} ({model_type}): transformers has no image-text-to-text class for it and "
                    f"its own class {type(model).__name__} has no `chat` method to ask it with"
                )
        return cls(model.to(device).eval(), processor, max_new_tokens=max_new_tokens)

    @torch.inference_mode()
    def ask(self, image: Image.Image, question: str) -> str:
        """Asks `question` about `image` and returns the decoded answer."""
        if callable(getattr(self.model, "chat", None)):
            return self.model.chat(
                image=None,
                msgs=[{"role": "user", "content": [image, question]}],
                tokenizer=self.processor,
                sampling=False,
                max_new_tokens=self.max_new_tokens,
            )
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=prompt, images=[image], return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]


def _pixel_box(box, size: tuple[int, int], where: str) -> tuple[int, int, int, int]:
    """A normalized `[x1, y1, x2, y2]` box in pixels of an image of `size`, truncated by `int()` as CreatiLayout
    does; a box that leaves no pixel is an error, as an empty crop would be judged on nothing."""
    if len(box) != 4 or not all(0.0 <= float(v) <= 1.0 for v in box):
        raise ValueError(f"{where}: box {box} is not a normalized [x1, y1, x2, y2] with values in [0, 1]")
    width, height = size
    x1, y1, x2, y2 = (int(float(v) * scale) for v, scale in zip(box, (width, height, width, height)))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(
            f"{where}: box {box} covers {x2 - x1}x{y2 - y1} pixels of the {width}x{height} image; "
            "a crop needs at least one pixel per side"
        )
    return x1, y1, x2, y2


def _ask_box(judge: Judge, crop: Image.Image, description: str, detail: str) -> dict[str, str]:
    """The parsed answers for one box: the attributes are asked only once the subject is judged present."""
    answers = {"spatial": parse_answer(judge.ask(crop, QUESTIONS["spatial"].format(description=description)))}
    if answers["spatial"] == "yes":
        for attribute in ATTRIBUTES:
            question = QUESTIONS[attribute].format(description=description, detail=detail)
            answers[attribute] = parse_answer(judge.ask(crop, question))
    return answers


def judge_layoutsam(
    judge: Judge, records: Iterable[dict], image_dir: str | os.PathLike, progress: bool = True
) -> dict:
    """Scores generated images on LayoutSAM-Eval with a vision-language judge.

    Args:
        judge ([`Judge`]): answers the questions, e.g. an [`HFJudge`].
        records (`Iterable[dict]`): one per image, `{"file_name": str, "regions": [{"description": str,
            "detail": str, "box": [x1, y1, x2, y2]}]}` with boxes normalized to [0, 1]. A "/" in a caption is
            dropped, as in the original.
        image_dir (`str` or `os.PathLike`): the folder holding each record's generated `file_name`.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar over the records.

    Returns:
        `dict`: `spatial`, `color`, `texture`, `shape` (the share of all boxes answered yes, 0-100) and `overall`
        (their mean), each `None` when there are no boxes; `boxes`; `answers`, the yes/no/neither counts of each
        question kind (the attribute kinds count only the questions asked); and `per_image`, for each file name its
        `boxes` and its yes count of each kind.
    """
    image_dir = Path(image_dir)
    answers = {kind: dict.fromkeys(ANSWERS, 0) for kind in KINDS}
    per_image: dict[str, dict[str, int]] = {}
    for index, record in enumerate(tqdm(records, desc="LayoutSAM judge", unit="image", disable=not progress)):
        file_name = record["file_name"]
        if file_name in per_image:
            raise ValueError(f"record {index}: {file_name} was already scored by an earlier record")
        path = image_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"record {index}: generated image {file_name} not found in {image_dir}")
        with Image.open(path) as opened:
            # The processors expect RGB; a generator may save RGBA or grayscale.
            image = opened.convert("RGB")
        yes = {"boxes": len(record["regions"]), **dict.fromkeys(KINDS, 0)}
        for r, region in enumerate(record["regions"]):
            where = f"record {index} ({file_name}) region {r}"
            missing = [key for key in ("description", "detail", "box") if key not in region]
            if missing:
                raise ValueError(f"{where}: missing {', '.join(missing)}")
            crop = image.crop(_pixel_box(region["box"], image.size, where))
            description, detail = region["description"].replace("/", ""), region["detail"].replace("/", "")
            for kind, answer in _ask_box(judge, crop, description, detail).items():
                answers[kind][answer] += 1
                yes[kind] += answer == "yes"
        per_image[file_name] = yes

    boxes = sum(image["boxes"] for image in per_image.values())
    scores = {
        kind: 100.0 * sum(image[kind] for image in per_image.values()) / boxes if boxes else None for kind in KINDS
    }
    scores["overall"] = sum(scores[kind] for kind in KINDS) / len(KINDS) if boxes else None
    unclear = sum(counts["neither"] for counts in answers.values())
    if unclear:
        asked = sum(sum(counts.values()) for counts in answers.values())
        logger.warning("The judge answered neither yes nor no to %d of %d questions; they count as no", unclear, asked)
    return {**scores, "boxes": boxes, "answers": answers, "per_image": per_image}
