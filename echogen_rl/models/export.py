"""`echogen-rl export`: a trained checkpoint as a clean LoRA adapter or a merged Janus checkpoint, with a model card.

The checkpoint is a trainer's output directory or one of its `checkpoint-N` folders: a PEFT adapter
(`adapter_config.json`, whose `base_model_name_or_path` names the base) or a full model (`config.json`).

    echogen-rl export --checkpoint outputs/cyclerl-shapes-tiny --output exports/cyclerl-lora
    echogen-rl export --checkpoint outputs/cyclerl-shapes-tiny --output exports/cyclerl-merged --merge

An adapter export loads with `PeftModel.from_pretrained(JanusForConditionalGeneration.from_pretrained(base), DIR)`;
a merged one with plain `JanusForConditionalGeneration.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from peft import PeftConfig
from transformers import AutoTokenizer, JanusForConditionalGeneration
from transformers.utils import cached_file

from echogen_rl.models.loading import attach_adapter, check_checkpoint, loading_errors, looks_like_hub_id
from echogen_rl.models.prompts import add_layout_tokens

STAGES = ("pmtp", "djo", "cyclerl")
# Files of the Janus processor (image processor, chat template) that a merged checkpoint carries over from its base.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")


def checkpoint_kind(path: str | os.PathLike) -> str:
    """`"adapter"` or `"model"`: what a checkpoint directory holds; raises `FileNotFoundError` naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    steps = sorted(path.glob("checkpoint-*"), key=_step)
    hint = f"; it holds {', '.join(p.name for p in steps)}: pass one of them" if steps else ""
    raise FileNotFoundError(
        f"--checkpoint {path}: no adapter (adapter_config.json) or model (config.json) there{hint}"
    )


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match[1]) if match else -1


def _load_base(base: str, where: str) -> JanusForConditionalGeneration:
    """The base model, with errors that say which base and where it was named."""
    if not looks_like_hub_id(base) and not Path(base).expanduser().exists():
        raise FileNotFoundError(f"base model {base} ({where}) does not exist; pass --base DIR to use another path")
    check_checkpoint(Path(base).expanduser())
    try:
        with loading_errors(f"base model {base} ({where})"):
            return JanusForConditionalGeneration.from_pretrained(base)
    except OSError as err:
        raise FileNotFoundError(f"base model {base} ({where}) could not be loaded: {err}") from err


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _trainer_state(checkpoint: Path) -> tuple[dict | None, Path | None]:
    """`trainer_state.json` of a `checkpoint-N` folder, or of the latest one inside a trainer output directory."""
    for folder in (checkpoint, *sorted(checkpoint.glob("checkpoint-*"), key=_step, reverse=True)):
        state = _read_json(folder / "trainer_state.json")
        if state is not None:
            return state, folder / "trainer_state.json"
    return None, None


def _stage(checkpoint: Path) -> str | None:
    """The stage, from the tags of the model card that TRL writes (the stage trainers tag themselves)."""
    for card in (checkpoint / "README.md", *checkpoint.glob("checkpoint-*/README.md")):
        try:
            tags = ModelCard.load(card).data.tags or []
        except Exception:  # a hand-edited or foreign README is no reason to fail an export
            continue
        found = [s for s in STAGES if s in tags]
        if found:
            return found[0]
    return None


def _last_metrics(log_history: list[dict]) -> dict[str, tuple[float, int | None]]:
    """The last logged value of each numeric metric, with its step."""
    metrics = {}
    for entry in log_history:
        for key, value in entry.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = (value, entry.get("step"))
    return metrics


def model_card(
    checkpoint: Path, output: Path, base: str | None, kind: str, peft_config: PeftConfig | None = None
) -> ModelCard:
    """A model card for an export: base model, stage, training summary and the last logged metrics.

    Args:
        checkpoint (`Path`): the exported checkpoint.
        output (`Path`): where the export goes (named in the usage snippet).
        base (`str`, *optional*): the base model, if known.
        kind (`str`): `"adapter"`, `"merged"` or `"model"`.
        peft_config (`PeftConfig`, *optional*): the adapter's configuration, summarized for an adapter or merge.
    """
    stage = _stage(checkpoint)
    state, state_path = _trainer_state(checkpoint)
    tags = ["echogen-rl", "janus", "layout-to-image", "grounding", *([stage] if stage else [])]
    tags += ["lora"] if peft_config is not None else []
    data = ModelCardData(base_model=base, library_name="peft" if kind == "adapter" else "transformers", tags=tags)
    what = {"adapter": "a LoRA adapter", "merged": "a LoRA adapter merged into its base", "model": "a full model"}
    lines = [
        f"# {output.name}",
        "",
        f"An echogen-rl checkpoint ({what[kind]}): one Janus model for layout -> image (L2I) and image -> layout",
        f"grounding (I2L). Stage: **{stage or 'unknown'}**. Base model: `{base or 'unknown'}`.",
        f"Exported from `{checkpoint}`.",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoTokenizer, JanusForConditionalGeneration",
    ]
    if kind == "adapter":
        lines += [
            "from peft import PeftModel",
            "",
            f'model = PeftModel.from_pretrained(JanusForConditionalGeneration.from_pretrained("{base}"), "{output}")',
        ]
        cli_model = f"--model {base} --adapter {output}"
    else:
        lines += ["", f'model = JanusForConditionalGeneration.from_pretrained("{output}")']
        cli_model = f"--model {output}"
    lines += [
        f'tokenizer = AutoTokenizer.from_pretrained("{output}")',
        "```",
        "",
        f'    echogen-rl generate {cli_model} --caption "..." --box "red square:0.1,0.1,0.5,0.5" --out sample.png',
        "",
        "## Training",
        "",
    ]
    if peft_config is not None:
        lines.append(
            f"- LoRA: r={peft_config.r}, alpha={peft_config.lora_alpha}, dropout={peft_config.lora_dropout}, "
            f"targets `{peft_config.target_modules}`"
        )
    if state is not None:
        for key in ("global_step", "max_steps", "num_train_epochs", "train_batch_size", "logging_steps", "save_steps"):
            if key in state:
                lines.append(f"- {key}: {state[key]}")
        lines.append(f"- from `{state_path}`")
        metrics = _last_metrics(state.get("log_history", []))
        if metrics:
            lines += ["", "## Metrics (last logged value)", "", "| metric | value | step |", "|---|---|---|"]
            lines += [f"| {k} | {v:.6g} | {step} |" for k, (v, step) in metrics.items()]
    else:
        lines.append("- no trainer_state.json found: steps and metrics unknown")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_model_card(card: ModelCard, folder: Path) -> None:
    card.save(folder / "README.md")


def _copy_processor_files(base: str, folder: Path) -> None:
    for name in PROCESSOR_FILES:
        if (folder / name).exists():
            continue
        try:
            found = cached_file(base, name, _raise_exceptions_for_missing_entries=False)
        except OSError:  # offline with a hub base: the tokenizer and weights are what matter
            found = None
        if found:
            shutil.copy(found, folder / name)


def _commit(tmp: Path, out: Path) -> None:
    """Moves the finished export into place; an old output is removed only once the new one is there."""
    old = out.with_name(f".{out.name}.old") if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    merge: bool = False,
    overwrite: bool = False,
    base: str | None = None,
) -> Path:
    """Exports a checkpoint; written to a temporary sibling folder and renamed, so a failed export leaves no output.

    Args:
        checkpoint (`str` or `os.PathLike`): a trainer output directory or `checkpoint-N` folder.
        output (`str` or `os.PathLike`): the export directory; must not exist or be empty unless `overwrite`.
        merge (`bool`, *optional*, defaults to `False`): merge the adapter into the base (`merge_and_unload`) and
            write a plain `JanusForConditionalGeneration` checkpoint; meaningless for a full model (refused).
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output`.
        base (`str`, *optional*): the base model of an adapter, instead of its `base_model_name_or_path`.

    Returns:
        `Path`: the export directory.
    """
    checkpoint, out = Path(checkpoint), Path(output)
    kind = checkpoint_kind(checkpoint)
    check_checkpoint(checkpoint)
    if kind == "model" and merge:
        raise ValueError(f"--merge: {checkpoint} holds a full model, not an adapter; there is nothing to merge")
    if out.resolve() == checkpoint.resolve() or out.resolve() in checkpoint.resolve().parents:
        raise ValueError(f"--output {out} would replace the checkpoint {checkpoint} it exports")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--output {out} exists and is not empty; pass --overwrite to replace it")

    peft_config = None
    if kind == "adapter":
        peft_config = PeftConfig.from_pretrained(str(checkpoint))
        where = f"base_model_name_or_path in {checkpoint / 'adapter_config.json'}"
        base = base or peft_config.base_model_name_or_path
        if not base:
            raise ValueError(f"{checkpoint}: the adapter names no base model; pass --base DIR")
        model = _load_base(base, "--base" if base != peft_config.base_model_name_or_path else where)
        # The trainer saves the tokenizer it trained with beside the adapter; an adapter alone uses its base's.
        has_tokenizer = (checkpoint / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint if has_tokenizer else base)
        add_layout_tokens(tokenizer, model)
        model = attach_adapter(model, checkpoint)
        model.peft_config["default"].base_model_name_or_path = base
    else:
        if not (checkpoint / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"{checkpoint}: a full model needs its tokenizer beside it (tokenizer_config.json)"
            )
        with loading_errors(str(checkpoint)):
            model = JanusForConditionalGeneration.from_pretrained(checkpoint)
            tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        base = base or _card_base(checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if merge:
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if merge:
            _copy_processor_files(base, tmp)
        card_kind = "merged" if merge else kind
        write_model_card(model_card(checkpoint, out, base, card_kind, peft_config), tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is shared like any other folder
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _card_base(checkpoint: Path) -> str | None:
    """The base model that TRL's model card names for a full fine-tune, if any."""
    try:
        return ModelCard.load(checkpoint / "README.md").data.base_model
    except Exception:
        return None
