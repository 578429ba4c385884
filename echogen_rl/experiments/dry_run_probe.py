"""What a dry run measures during its steps (see [`echogen_rl.experiments.dry_run`]): time, tokens and memory per
step, parameter counts, and whether training changed the weights."""

from __future__ import annotations

import resource
import threading
import time

import psutil
import torch
from transformers import Trainer, TrainerCallback

from echogen_rl.models.modeling import unwrap_janus


class StepProbe(TrainerCallback):
    """Times each optimizer step and measures its tokens and memory (CUDA allocated memory on a GPU, else the
    process RSS sampled every 5 ms).

    Per step: `seconds`; `tokens`, the positions the language model runs in the step's graph-building forwards
    (padding excluded where the forward has a 2D attention mask); and, in bytes above the memory at the step's
    start, `forward` (the peak before the backward: activations, and rollouts for CycleRL), `gradients` (held
    after the backward) and `peak`.
    """

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.steps: list[dict] = []
        self.parameters: dict = {}
        self.changed: dict = {}
        self._process, self._peak, self._tokens, self._current = psutil.Process(), 0, 0, {}
        self.clock, self.setup_seconds = time.perf_counter(), 0.0
        self._sampling, self._thread, self._hook, self._lock = False, None, None, threading.Lock()

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else self._process.memory_info().rss

    def _peak_since_start(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else max(self._peak, self._now())

    def _sample(self) -> None:
        while self._sampling:
            with self._lock:  # a reset at a step's start must not be overwritten by the peak before it
                self._peak = max(self._peak, self._now())
            time.sleep(0.005)

    def _count_tokens(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return  # rollouts, grounding and reference log-probs build no graph
        mask, x = kwargs.get("attention_mask"), kwargs.get("inputs_embeds", kwargs.get("input_ids"))
        x = args[0] if x is None and args else x
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            self._tokens += int(mask.sum())
        elif x is not None:
            self._tokens += x.shape[0] * x.shape[1]

    def attach(self, trainer: Trainer) -> None:
        """Hooks the language model (token counts) and the accelerator's backward (memory before it)."""
        self.trainer = trainer
        language_model = unwrap_janus(trainer.model).model.language_model
        self._hook = language_model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        backward = trainer.accelerator.backward

        def measured_backward(loss, **kwargs):
            self._current["forward"] = self._peak_since_start() - self._current["start"]
            return backward(loss, **kwargs)

        trainer.accelerator.backward = measured_backward

    def on_train_begin(self, args, state, control, **kwargs):
        self.setup_seconds = time.perf_counter() - self.clock
        params = list(self.trainer.model.parameters())
        trainable = [p for p in params if p.requires_grad]
        self.parameters = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in trainable),
            "weights_bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
            # What a sharded run gathers at once (`shard_janus`'s units): the root (text embeddings and head) and
            # one decoder layer, in elements.
            **_unit_sizes(self.trainer.model),
        }
        self._before = [(p, p.detach().reshape(-1)[:64].clone()) for p in trainable]
        if not self.cuda:
            self._sampling, self._thread = True, threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        with self._lock:
            self._peak, self._tokens = self._now(), 0
        self._current = {"start": self._peak, "clock": time.perf_counter()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._current["gradients"] = self._now() - self._current["start"]

    def on_step_end(self, args, state, control, **kwargs):
        c = self._current
        self.steps.append(
            {
                "seconds": time.perf_counter() - c["clock"],
                "tokens": self._tokens,
                "start_bytes": c["start"],
                "forward_bytes": c.get("forward", 0),
                "gradients_bytes": c.get("gradients", 0),
                "peak_bytes": self._peak_since_start() - c["start"],
            }
        )

    def on_train_end(self, args, state, control, **kwargs):
        self._sampling = False
        if self._thread is not None:
            self._thread.join()
        self._hook.remove()
        moved = sum(not torch.equal(p.detach().reshape(-1)[:64], before) for p, before in self._before)
        self.changed = {"tensors_sampled": len(self._before), "tensors_changed": int(moved)}


def probed(trainer_cls: type, probe: StepProbe) -> type:
    """`trainer_cls` with `probe` attached to each trainer it builds (see [`StepProbe.attach`])."""

    class DryRunTrainer(trainer_cls):
        """The recipe's trainer with the probe; the recipe's closing `save_model` writes nothing (GBs at 7B)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(probe)
            probe.attach(self)

        def save_model(self, output_dir=None, _internal_call=False):
            pass

    DryRunTrainer.__name__ = DryRunTrainer.__qualname__ = trainer_cls.__name__
    return DryRunTrainer


def _unit_sizes(model: torch.nn.Module) -> dict[str, int]:
    janus = unwrap_janus(model)
    root = {id(p): p for m in (janus.get_input_embeddings(), janus.lm_head) for p in m.parameters()}
    return {
        "root_unit": sum(p.numel() for p in root.values()),
        "decoder_layer": sum(p.numel() for p in janus.model.language_model.layers[0].parameters()),
    }


def measured(probe: StepProbe, phases: dict, per_device_batch: int) -> dict:
    """The report's `measured` part: what `probe` saw, after the seconds of each phase before training (`phases`)."""
    return {
        "device": torch.cuda.get_device_name() if probe.cuda else "cpu",
        **phases,
        "per_device_batch": per_device_batch,
        "steps": probe.steps,
        "parameters": probe.parameters,
        "trainable_values": probe.changed,
        "process_peak_bytes": max(s["start_bytes"] + s["peak_bytes"] for s in probe.steps)
        if probe.cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "last_log": next((h for h in reversed(probe.trainer.state.log_history) if "loss" in h), {}),
    }
