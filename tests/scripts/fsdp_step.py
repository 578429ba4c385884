"""One optimizer step of a stage's own loss function (CycleRL: on its own rollout) under FSDP2 (`shard_janus`) on the processes of
`torch.distributed.run`, beside the same step unsharded in each process: rank r takes micro-batch r of the global
batch; the unsharded reference averages the loss over all micro-batches (the gradient FSDP2's reduce-scatter
averages to). Each rank writes `rank{r}.pt`: its loss, the reference losses, and the trainable parameters after the
step, gathered whole, with the reference's.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/fsdp_step.py CKPT OUT --stage pmtp
"""

import argparse
import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.collators import LoopLossCollator, PMTPCollator
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.layout import Layout
from echogen_rl.models.modeling import freeze_untrained, image_token_logprobs, unwrap_janus
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.models.sharding import save_sharded_pretrained, shard_janus
from echogen_rl.rollout.torch_engine import TorchRolloutEngine
from echogen_rl.trainer.djo_trainer import djo_losses
from echogen_rl.trainer.pmtp_trainer import pmtp_losses

PER_RANK = 2  # rows per micro-batch
ROLLOUTS: dict[int, list[torch.Tensor]] = {}  # CycleRL: micro-batch -> its codes, unsharded then sharded


def stage_loss(stage: str, prompts: PromptBuilder):
    """`(collate, loss(model, batch, index))` of a stage: its collator and its own loss function."""
    if stage == "pmtp":

        def loss(model, batch, index):
            parts = pmtp_losses(model, batch)
            return parts["img"].loss + parts["text"].loss

        return PMTPCollator(prompts), loss
    if stage == "djo":
        special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)

        def loss(model, batch, index):
            # The Gumbel noise of micro-batch `index` is the same in the sharded and the reference step (the
            # teacher-forced loop image draws it from the global generator).
            torch.manual_seed(100 + index)
            generator = torch.Generator().manual_seed(100 + index)
            return djo_losses(model, batch, 1.0, special_ids=special, i2l_weight=1.0, generator=generator).loss

        return LoopLossCollator(prompts), loss
    if stage == "cyclerl":
        special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)

        def collate(rows):
            segments = [prompts.l2i_prompt(Layout.from_json(row["layout"])) for row in rows]
            return pad_segments(segments, prompts.pad_id, "left")

        def loss(model, batch, index):
            # GRPO's objective on its own rollout: the rollout reads the (gathered) weights, the loss the
            # teacher-forced log-probs of the sampled codes under CFG, weighted by fixed advantages.
            ids, mask = batch["input_ids"], batch["attention_mask"]
            engine = TorchRolloutEngine(model, prompts.num_image_tokens, *special)
            # Temperature 2: the randomized model is peaked, and a near-zero loss would make "within 2%" meaningless.
            codes = engine.generate(ids, mask, 3.0, 2.0, None, torch.Generator().manual_seed(100 + index)).codes
            ROLLOUTS.setdefault(index, []).append(codes)
            # Scored on the unsharded float32 rollout's codes, so that under bf16 only the loss's precision differs.
            logps = image_token_logprobs(model, ids, mask, ROLLOUTS[index][0], special, 3.0, 2.0)
            return -(logps.mean(-1) * torch.tensor([1.0, 0.5])).mean()

        return collate, loss
    raise ValueError(f"unknown stage {stage!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--stage", choices=["pmtp", "djo", "cyclerl"], required=True)
    parser.add_argument("--bf16", action="store_true", help="bf16 compute, float32 reduction (MixedPrecisionPolicy)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the attention projections")
    parser.add_argument("--export", help="save the sharded result here with save_sharded_pretrained")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    model = JanusForConditionalGeneration.from_pretrained(args.checkpoint).train()
    with torch.no_grad():  # weights that vary, so that every gradient differs from the others
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    freeze_untrained(model)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
        )
        with torch.no_grad():  # B starts at 0: give it values, so that the adapters change the forward
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = copy.deepcopy(model)
    prompts = PromptBuilder(AutoTokenizer.from_pretrained(args.checkpoint), 64)
    collate, loss_fn = stage_loss(args.stage, prompts)
    rows = build_shapes_dataset(PER_RANK * world, seed=0)
    batches = [collate([rows[i] for i in range(r * PER_RANK, (r + 1) * PER_RANK)]) for r in range(world)]

    reference_losses = [loss_fn(reference, batch, r) for r, batch in enumerate(batches)]
    torch.stack(reference_losses).mean().backward()
    torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5).step()

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    shard_janus(model, mesh=init_device_mesh("cpu", (world,)), mp_policy=policy)
    seen = {}
    projection = unwrap_janus(model).model.language_model.layers[0].self_attn.q_proj

    def record(module, args):  # returns None: a value would replace the input
        weight = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
        seen.setdefault("compute_dtype", str(weight.dtype))

    projection.register_forward_pre_hook(record)
    loss = loss_fn(model, batches[rank], rank)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()

    def whole(p):
        return p.full_tensor() if isinstance(p, DTensor) else p

    after = {n: whole(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if args.export:
        save_sharded_pretrained(model, args.export)
    torch.save(
        {
            "rank": rank,
            "loss": loss.detach().float(),
            "reference_losses": [x.detach() for x in reference_losses],
            "before": before,
            "after": after,
            "reference_after": {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad},
            "sharded": {n: isinstance(p, DTensor) for n, p in model.named_parameters()},
            "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
            "compute_dtype": seen["compute_dtype"],
            "rollouts": ROLLOUTS,
        },
        Path(args.out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
