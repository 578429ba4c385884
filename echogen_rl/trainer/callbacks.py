"""Seeing training as it happens: sample images, reward histograms and stage curves.

[`SampleImagesCallback`] logs, through the trainer's own `report_to` writers (TensorBoard, W&B; nothing under
`report_to: none`):

- every `log_images_steps` steps, a grid of images generated for a fixed set of layouts (the same at every step, so a
  reader watches them change), with the target boxes and the boxes the model's grounder recovers drawn as in `eval`;
- for CycleRL, at the same steps, one group of rollouts of one prompt with each image's reward and advantage written
  on it, and at every logging step a histogram of each reward function's values.

Images are made on the main process only, in no-grad; a failure to log (a missing writer, a full disk) is a warning,
never a lost run. [`plot_runs`] draws several runs' curves from their `trainer_state.json` (`echogen-rl plot`).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback

from echogen_rl.eval.visualize import image_grid, overlay, save_png
from echogen_rl.layout import Layout

SAMPLE_SEED = 0  # the noise of the logged samples: fixed, so that a change between steps is the model's


@dataclass
class SampleLoggingArguments:
    """The fields every stage's config adds for [`SampleImagesCallback`].

    Parameters:
        log_images_steps (`int`, *optional*, defaults to `0`):
            Log a grid of generated images (and, for CycleRL, one group of rollouts) every this many steps; `0` logs
            none. Reward histograms (CycleRL) follow `logging_steps` whenever a writer is configured.
        log_images_count (`int`, *optional*, defaults to `8`):
            How many fixed layouts the grid draws (taken from the evaluation data, else the training data).
    """

    log_images_steps: int = field(
        default=0, metadata={"help": "Log generated sample images every N steps (0: never)."}
    )
    log_images_count: int = field(default=8, metadata={"help": "Layouts in the logged sample grid."})

    def check_sample_logging(self) -> None:
        name = type(self).__name__
        if self.log_images_steps < 0:
            raise ValueError(f"{name}.log_images_steps must be >= 0, got {self.log_images_steps}")
        if self.log_images_count < 1:
            raise ValueError(f"{name}.log_images_count must be >= 1, got {self.log_images_count}")


def dataset_layouts(dataset, count: int) -> list[Layout]:
    """The first `count` layouts of a dataset with a `layout` (JSON) or a CycleRL `prompt` column."""
    from echogen_rl.models.prompts import parse_prompt_text

    if dataset is None or len(dataset) == 0:
        return []
    rows = dataset.select(range(min(count, len(dataset))))
    if "layout" in rows.column_names:
        layouts = [Layout.from_json(text) for text in rows["layout"]]
        for layout, caption in zip(layouts, rows["caption"] if "caption" in rows.column_names else []):
            layout.caption = caption or layout.caption
        return layouts
    if "prompt" in rows.column_names:
        return [parse_prompt_text(p if isinstance(p, str) else p[-1]["content"]) for p in rows["prompt"]]
    return []


def attach_sample_logging(trainer, datasets: Sequence) -> SampleImagesCallback | None:
    """Adds a [`SampleImagesCallback`] to `trainer` when it has something to log: sample grids (`log_images_steps`,
    layouts from the first of `datasets` that has some, e.g. `(eval_dataset, train_dataset)`) or reward histograms
    (a trainer with `last_rewards`, CycleRL's)."""
    args = trainer.args
    layouts: list[Layout] = []
    if args.log_images_steps:
        for data in datasets:
            if isinstance(data, dict):  # several eval sets: the first
                data = next(iter(data.values()), None)
            layouts = dataset_layouts(data, args.log_images_count)
            if layouts:
                break
        else:
            warnings.warn(
                "log_images_steps: the evaluation and training data hold no layouts; no sample grid", stacklevel=2
            )
    if not layouts and not hasattr(trainer, "last_rewards"):
        return None
    callback = SampleImagesCallback(trainer, layouts)
    trainer.add_callback(callback)
    return callback


def writers(callbacks) -> list[tuple[str, object]]:
    """The trainer's live image writers: `("tensorboard", SummaryWriter)` and `("wandb", wandb module)`."""
    out = []
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
            out.append(("tensorboard", callback.tb_writer))
        elif isinstance(callback, WandbCallback) and getattr(callback, "_initialized", False):
            out.append(("wandb", callback._wandb))
    return out


class SampleImagesCallback(TrainerCallback):
    """Logs sample grids and reward histograms of a stage's trainer (see the module docstring).

    Args:
        trainer: the stage's trainer; its `args` carry `log_images_steps` and `log_images_count`.
        layouts (`Sequence[Layout]`): the fixed layouts the sample grid draws.
    """

    def __init__(self, trainer, layouts: Sequence[Layout]):
        self.trainer = trainer
        self.layouts = list(layouts)
        self.seconds: list[float] = []  # wall time of each image logging step, for the record
        self._decoder = None  # the model's image decoder, built on first use (reading its VQ model is not free)

    def _emit(self, what: str, log) -> None:
        sinks = writers(self.trainer.callback_handler.callbacks)
        for name, writer in sinks:
            try:
                log(name, writer)
            except Exception as err:  # a writer's failure (disk full, closed run) must not end training
                warnings.warn(f"could not log {what} to {name}: {type(err).__name__}: {err}", stacklevel=2)

    def on_step_end(self, args, state, control, **kwargs):
        steps = getattr(args, "log_images_steps", 0)
        if not steps or state.global_step % steps or not state.is_world_process_zero:
            return
        if not writers(self.trainer.callback_handler.callbacks):
            return
        start = time.perf_counter()
        try:
            grid = self.sample_grid() if self.layouts else None
            group = self.rollout_group() if hasattr(self.trainer, "last_rollouts") else None
        except Exception as err:  # drawing samples is a view on training, never a reason to stop it
            warnings.warn(f"could not draw sample images: {type(err).__name__}: {err}", stacklevel=2)
            return
        step = state.global_step
        if grid is not None:
            self._emit("sample images", lambda name, w: _log_image(name, w, "samples/layouts", grid, step))
        if group is not None:
            self._emit("a rollout group", lambda name, w: _log_image(name, w, "samples/rollout_group", group, step))
        self.seconds.append(time.perf_counter() - start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        rewards = getattr(self.trainer, "last_rewards", None)
        if rewards is None or not state.is_world_process_zero:
            return
        names = self.trainer.reward_func_names
        step = state.global_step
        for i, name in enumerate(names):
            values = rewards[:, i].numpy()
            values = values[np.isfinite(values)]
            if values.size:
                self._emit(
                    f"the {name} histogram",
                    lambda sink, w, v=values, n=name: _log_histogram(sink, w, f"rewards/{n}", v, step),
                )

    @torch.no_grad()
    def sample_grid(self) -> Image.Image:
        """The fixed layouts drawn by the model now, with target and recovered boxes."""
        from echogen_rl.eval.inference import generate_images
        from echogen_rl.models.grounding import Grounder
        from echogen_rl.models.modeling import unwrap_janus
        from echogen_rl.models.prompts import PromptBuilder
        from echogen_rl.models.sampling import resolve_guidance_scale

        model = unwrap_janus(self.trainer.accelerator.unwrap_model(self.trainer.model))
        tokenizer = self.trainer.processing_class
        was_training = model.training
        model.eval()
        try:
            guidance = getattr(self.trainer.args, "guidance_scale", None)
            guidance = resolve_guidance_scale(model, guidance, "log_images_steps")
            codes = generate_images(model, tokenizer, self.layouts, guidance, 1.0, SAMPLE_SEED, len(self.layouts))
            prompts = PromptBuilder(tokenizer, model.config.vision_config.num_image_tokens)
            recovered = [g.layout for g in Grounder(model, prompts)(codes, [t.phrases for t in self.layouts])]
        finally:
            model.train(was_training)
        images = self._decode(model, codes)
        tiles = [overlay(im, t, r) for im, t, r in zip(images, self.layouts, recovered)]
        return image_grid(tiles, columns=min(4, len(tiles)))

    def rollout_group(self) -> Image.Image | None:
        """The first group of the latest CycleRL batch: each image with its reward and advantage as its title."""
        from echogen_rl.models.modeling import unwrap_janus

        rollouts, rewards = self.trainer.last_rollouts, self.trainer.last_rewards
        if rollouts is None or rewards is None:
            return None
        g = self.trainer.num_generations
        totals = (rewards[:g] * self.trainer.reward_weights.cpu()).nansum(dim=1)
        advantages = rollouts.get("advantages")
        model = unwrap_janus(self.trainer.accelerator.unwrap_model(self.trainer.model))
        images = self._decode(model, rollouts["codes"][:g])
        tiles = [overlay(im, rollouts["targets"][k], rollouts["recovered"][k]) for k, im in enumerate(images)]
        titles = [
            f"r {float(totals[k]):.3f} A {float(advantages[k]) if advantages is not None else math.nan:+.2f}"
            for k in range(len(tiles))
        ]
        return image_grid(tiles, columns=min(4, len(tiles)), titles=titles)

    def _decode(self, model, codes) -> list[Image.Image]:
        if self._decoder is None:
            from echogen_rl.eval.generate import image_tokenizer_for
            from echogen_rl.models.palette import PALETTE

            vq = image_tokenizer_for(model)
            # The tiny checkpoint's codebook is the shapes palette: draw its codes as the shapes world does.
            self._decoder = image_tokenizer_for(model, palette=True) if vq.codebook_size == len(PALETTE) else vq
        return self._decoder.decode(codes)


def _log_image(sink: str, writer, tag: str, image: Image.Image, step: int) -> None:
    if sink == "tensorboard":
        writer.add_image(tag, np.asarray(image.convert("RGB")), global_step=step, dataformats="HWC")
        writer.flush()
    else:
        writer.log({tag: writer.Image(image)}, commit=False)


def _log_histogram(sink: str, writer, tag: str, values: np.ndarray, step: int) -> None:
    if sink == "tensorboard":
        writer.add_histogram(tag, values, global_step=step)
        writer.flush()
    else:
        writer.log({tag: writer.Histogram(values)}, commit=False)


# Curves `plot_runs` draws by default: the first name a run logged of each group.
CURVES = {
    "loss": ("loss",),
    "reward": ("reward", "rewards/cycle_iou/mean"),
    "cycle mIoU": ("cycle_miou",),
}
_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def trainer_state(run: str | os.PathLike) -> dict:
    """A run's `trainer_state.json`: in the run folder, else in its latest `checkpoint-N`."""
    run = Path(run)
    candidates = [run / "trainer_state.json"]
    steps = sorted(run.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    candidates += steps[::-1]
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
    raise FileNotFoundError(f"{run}: no trainer_state.json (nor in a checkpoint-N folder)")


def plot_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike, curves: dict | None = None) -> Path:
    """One PNG with a panel per curve (loss, reward, cycle mIoU by default), each run a line of its own color.

    Args:
        runs (`Sequence[str | os.PathLike]`): run folders (a trainer's `output_dir` or one of its checkpoints).
        out (`str` or `os.PathLike`): the PNG to write.
        curves (`dict`, *optional*): `{panel title: (logged names, first found is drawn)}`; defaults to `CURVES`.
    """
    curves = curves or CURVES
    histories = {str(run): trainer_state(run).get("log_history", []) for run in runs}
    panels = []
    for title, names in curves.items():
        lines = {}
        for run, history in histories.items():
            name = next((n for n in names if any(n in h for h in history)), None)
            if name is not None:
                lines[run] = [(h["step"], float(h[name])) for h in history if name in h and "step" in h]
        if lines:
            panels.append((title, lines))
    if not panels:
        raise ValueError(f"none of the runs logged any of {sorted(n for ns in curves.values() for n in ns)}")
    width, height, pad = 420, 300, 48
    image = Image.new("RGB", (width * len(panels), height + 26 * len(histories) + 10), "white")
    draw = ImageDraw.Draw(image)
    for p, (title, lines) in enumerate(panels):
        x0 = p * width
        points = [pt for line in lines.values() for pt in line]
        xs, ys = [s for s, _ in points], [v for _, v in points if math.isfinite(v)]
        x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
        y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        y_hi = y_hi if y_hi > y_lo else y_lo + 1.0
        draw.text((x0 + pad, 6), title, fill="black")
        draw.rectangle([x0 + pad, 24, x0 + width - 12, height - 24], outline="black")
        draw.text((x0 + 4, 24), f"{y_hi:.3g}", fill="black")
        draw.text((x0 + 4, height - 34), f"{y_lo:.3g}", fill="black")
        draw.text((x0 + pad, height - 20), f"step {x_lo}", fill="black")
        draw.text((x0 + width - 90, height - 20), f"step {x_hi}", fill="black")

        def at(step, value, x0=x0, x_lo=x_lo, x_hi=x_hi, y_lo=y_lo, y_hi=y_hi):
            x = x0 + pad + (step - x_lo) / (x_hi - x_lo) * (width - pad - 12)
            y = height - 24 - (value - y_lo) / (y_hi - y_lo) * (height - 48)
            return x, y

        for run, line in lines.items():
            color = _COLORS[list(histories).index(run) % len(_COLORS)]
            finite = [(s, v) for s, v in line if math.isfinite(v)]
            if len(finite) > 1:
                draw.line([at(s, v) for s, v in finite], fill=color, width=2)
            for s, v in finite[:1] if len(finite) == 1 else []:
                x, y = at(s, v)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    for r, run in enumerate(histories):
        y = height + 6 + 26 * r
        draw.rectangle([10, y + 4, 24, y + 18], fill=_COLORS[r % len(_COLORS)])
        draw.text((32, y + 5), run, fill="black")
    return save_png(image, out)
