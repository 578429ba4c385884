"""Training as it happens: sample grids, rollout groups and reward histograms reach TensorBoard through `report_to`;
a failing writer warns and training goes on; `echogen-rl plot` draws saved runs' curves."""

import warnings

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from echogen_rl.cli import main
from echogen_rl.data.random_layouts import build_random_layout_dataset
from echogen_rl.data.shapes import build_shapes_dataset, phrase_pool
from echogen_rl.trainer.callbacks import SampleImagesCallback
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer

COMMON = dict(max_steps=2, logging_steps=1, save_strategy="no", use_cpu=True, bf16=False, seed=0)


def _pmtp(model, tokenizer, out, **kw):
    args = PMTPConfig(output_dir=str(out), per_device_train_batch_size=4, **{**COMMON, **kw})
    data = build_shapes_dataset(16, seed=0)
    return PMTPTrainer(model, args, train_dataset=data, eval_dataset=data.select(range(4)), processing_class=tokenizer)


def _cyclerl(model, tokenizer, out, **kw):
    args = CycleRLConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_generations=4,
        beta=0.0,
        grounding_model="policy",
        **{**COMMON, **kw},
    )
    prompts = build_random_layout_dataset(8, 0, phrase_pool(), grid_size=8)
    return CycleRLTrainer(model, ["cycle_iou"], args, train_dataset=prompts, processing_class=tokenizer)


def _tags(out) -> dict:
    (events,) = {p.parent for p in out.glob("runs/*/events.out.tfevents.*")}
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator.Tags()


@pytest.fixture(scope="module")
def logged_runs(tmp_path_factory):
    """A PMTP and a CycleRL run of 2 steps each, logging to TensorBoard, saved."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    from echogen_rl.models.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("observe")
    ckpt = build_tiny_checkpoint(root / "tiny")
    runs = {}
    for name, make in (("pmtp", _pmtp), ("cyclerl", _cyclerl)):
        model = JanusForConditionalGeneration.from_pretrained(ckpt)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        trainer = make(model, tokenizer, root / name, report_to=["tensorboard"], log_images_steps=1)
        trainer.train()
        trainer.save_state()
        runs[name] = trainer
    return root, runs


def test_sample_grids_and_reward_histograms_reach_tensorboard(logged_runs):
    root, runs = logged_runs
    tags = _tags(root / "pmtp")
    assert "samples/layouts" in tags["images"]
    tags = _tags(root / "cyclerl")
    assert {"samples/layouts", "samples/rollout_group"} <= set(tags["images"])
    assert "rewards/cycle_iou" in tags["histograms"]
    callback = next(c for c in runs["cyclerl"].callback_handler.callbacks if isinstance(c, SampleImagesCallback))
    assert len(callback.seconds) == 2 and len(callback.layouts) == 8  # one grid a step; the default count
    accumulator = EventAccumulator(str(next((root / "pmtp").glob("runs/*"))), size_guidance={"images": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Images("samples/layouts")] == [1, 2]  # the same layouts at every step


def test_plot_draws_the_curves_of_two_saved_runs(logged_runs, tmp_path, capsys):
    root, _ = logged_runs
    out = tmp_path / "curves.png"
    assert main(["plot", "--runs", str(root / "pmtp"), str(root / "cyclerl"), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.width == 3 * 420  # loss (both), reward and cycle mIoU (CycleRL): three panels
    assert main(["plot", "--runs", str(root / "pmtp"), "--out", str(out)]) == 2  # not over an existing file
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["plot", "--runs", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no trainer_state.json" in capsys.readouterr().err


def test_a_failing_writer_warns_and_training_goes_on(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_image", full_disk)
    trainer = _pmtp(tiny_model, tiny_tokenizer, tmp_path, report_to=["tensorboard"], log_images_steps=1)
    with pytest.warns(UserWarning, match="could not log sample images to tensorboard: OSError"):
        trainer.train()
    assert trainer.state.global_step == 2


def test_nothing_is_drawn_without_a_writer(tiny_model, tiny_tokenizer, tmp_path):
    trainer = _pmtp(tiny_model, tiny_tokenizer, tmp_path, report_to="none", log_images_steps=1)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SampleImagesCallback))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert callback.seconds == []  # report_to none: no grid was made
    assert not [w for w in caught if "could not" in str(w.message)]
    with pytest.raises(ValueError, match="log_images_steps must be >= 0"):
        PMTPConfig(output_dir=str(tmp_path), log_images_steps=-1, use_cpu=True, bf16=False)
