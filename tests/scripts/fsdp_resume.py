"""PMTP steps under FSDP2 with AdamW, optionally starting from or ending with a sharded checkpoint
(`save_sharded_state` / `load_sharded_state`): N steps unbroken must equal N/2 steps, a save, a fresh start from
the checkpoint, and N/2 more. Step k takes rows [k * world * 2, (k + 1) * world * 2) of the shapes data, rank r its
r-th pair. Each rank writes `rank{r}.pt`: its losses and the trainable weights after the last step, gathered whole.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/fsdp_resume.py CKPT OUT --steps 2
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.collators import PMTPCollator
from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.models.modeling import freeze_untrained
from echogen_rl.models.prompts import PromptBuilder
from echogen_rl.models.sharding import load_sharded_state, save_sharded_state, shard_janus
from echogen_rl.trainer.pmtp_trainer import pmtp_losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--first-step", type=int, default=0, help="the first step's index (which rows it takes)")
    parser.add_argument("--save", help="write a sharded checkpoint here after the last step")
    parser.add_argument("--load", help="start from this sharded checkpoint")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = JanusForConditionalGeneration.from_pretrained(args.checkpoint).train()
    freeze_untrained(model)
    shard_janus(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if args.load:
        load_sharded_state(model, optimizer, args.load)
    collate = PMTPCollator(PromptBuilder(AutoTokenizer.from_pretrained(args.checkpoint), 64))
    rows = build_shapes_dataset(2 * world * (args.first_step + args.steps), seed=0)
    losses = []
    for step in range(args.first_step, args.first_step + args.steps):
        first = (step * world + rank) * 2
        parts = pmtp_losses(model, collate([rows[first], rows[first + 1]]))
        loss = parts["img"].loss + parts["text"].loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    if args.save:
        save_sharded_state(model, optimizer, args.save)
    after = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    torch.save({"rank": rank, "losses": losses, "after": after}, Path(args.out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
