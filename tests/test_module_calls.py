"""Every weight a stage reads is read inside a call of the module that owns it: the property ZeRO-3 (which gathers a
module's parameters around its call) and FSDP2 need. Checked op by op on each stage's loss forward and on the
rollout, with a dispatch mode that knows which module calls are running."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from echogen_rl.data.collators import LoopLossCollator, PMTPCollator
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.layout import Layout
from echogen_rl.models.modeling import image_token_logprobs, mixed_forward, unwrap_janus
from echogen_rl.models.prompts import pad_segments
from echogen_rl.rollout.torch_engine import TorchRolloutEngine
from echogen_rl.trainer.djo_trainer import djo_losses
from echogen_rl.trainer.pmtp_trainer import pmtp_losses


class OwnedReads(TorchDispatchMode):
    """Records each op that reads a parameter's storage while no module owning that parameter is being called."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.owners: dict[int, set[int]] = {}
        self.names: dict[int, str] = {}
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                key = param.untyped_storage().data_ptr()
                self.owners.setdefault(key, set()).add(id(module))  # tied weights have two owners
                self.names.setdefault(key, f"{module_name}.{name}")
        self.calls: list[int] = []
        self.outside: list[tuple[str, str]] = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def enter(module, args):
            self.calls.append(id(module))

        def leave(module, args, output):  # returns None: a forward hook's return value would replace the output
            self.calls.pop()

        self._hooks = (register_module_forward_pre_hook(enter), register_module_forward_hook(leave))
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        running = set(self.calls)
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.numel():
                key = leaf.untyped_storage().data_ptr()
                if key in self.owners and not self.owners[key] & running:
                    self.outside.append((self.names[key], str(func)))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def shapes():
    return build_shapes_dataset(4, seed=0)


def _reads(model, step) -> list[tuple[str, str]]:
    with OwnedReads(model) as reads:
        step()
    return sorted(set(reads.outside))


def test_a_weight_read_outside_its_module_is_caught(noisy_model, prompts, shapes):
    """The check can fail: the text head's weight used directly, as a hand-written head would."""
    batch = PMTPCollator(prompts)([shapes[i] for i in range(2)])
    janus = unwrap_janus(noisy_model)

    def step():
        hidden = mixed_forward(
            noisy_model,
            batch["input_ids"],
            batch["image_mask"],
            position_ids=batch["position_ids"],
            segment_ids=batch["segment_ids"],
        )
        return hidden @ janus.lm_head.weight.T

    assert ("model.language_model.embed_tokens.weight", "aten.mm.default") in _reads(noisy_model, step)


def test_pmtp_loss_reads_every_weight_inside_its_module(noisy_model, prompts, shapes):
    batch = PMTPCollator(prompts)([shapes[i] for i in range(2)])
    assert _reads(noisy_model, lambda: pmtp_losses(noisy_model, batch)) == []


@pytest.mark.parametrize("loop_image", ["teacher_forced", "autoregressive"])
def test_djo_loss_reads_every_weight_inside_its_module(noisy_model, prompts, shapes, loop_image):
    """DJO's soft tokens mix the codebook by soft one-hots: inside `generation_embeddings`' own call."""
    batch = LoopLossCollator(prompts)([shapes[i] for i in range(2)])
    special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)
    kwargs = {"loop_image": loop_image, "special_ids": special, "i2l_weight": 1.0}
    generator = torch.Generator().manual_seed(0)
    assert _reads(noisy_model, lambda: djo_losses(noisy_model, batch, 1.0, generator=generator, **kwargs)) == []


def test_cyclerl_rollout_and_loss_read_every_weight_inside_its_module(noisy_model, prompts, shapes):
    layouts = [Layout.from_json(shapes[i]["layout"]) for i in range(2)]
    batch = pad_segments([prompts.l2i_prompt(layout) for layout in layouts], prompts.pad_id, "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)
    engine = TorchRolloutEngine(noisy_model, prompts.num_image_tokens, *special)
    out = {}

    def rollout():
        out["codes"] = engine.generate(ids, mask, 3.0, 1.0, None, torch.Generator().manual_seed(0)).codes

    assert _reads(noisy_model, rollout) == []
    loss = lambda: image_token_logprobs(noisy_model, ids, mask, out["codes"], special, 3.0)  # noqa: E731
    assert _reads(noisy_model, loss) == []
