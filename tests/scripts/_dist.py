"""Shared by the scripts that tests/test_distributed.py launches with `accelerate launch --num_processes 2`.

Each rank writes `rank{i}.pt` to the output directory: its trainable parameters before and after training,
and what it saw on the way (a fingerprint of every batch, losses, rewards), for the test to compare.
"""

import argparse
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", help="the tiny Janus checkpoint")
    parser.add_argument("out_dir", help="where each rank writes rank{i}.pt")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--rollout_engine", default="torch", help="CycleRL's rollout engine")
    return parser.parse_args()


def common_args(args: argparse.Namespace) -> dict:
    """Training arguments every stage shares here: CPU, float32, no checkpoints, fixed seed."""
    return dict(
        output_dir=str(Path(args.out_dir) / "run"),
        max_steps=args.steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def fingerprint(tensor: torch.Tensor) -> int:
    # Python hashes tuples of ints the same in every process (no hash randomization for ints).
    return hash(tuple(tensor.flatten().tolist()))


def write_rank(trainer, out_dir: str, before: dict[str, torch.Tensor], **record) -> None:
    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    result = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "wrapped": type(trainer.model_wrapped).__name__,
        "before": before,
        "after": trainable(model),
        **record,
    }
    torch.save(result, Path(out_dir) / f"rank{accelerator.process_index}.pt")
