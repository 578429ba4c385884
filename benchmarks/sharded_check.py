"""Two steps of one stage's shapes config under the accelerate launch it runs in, recording what actually ran.

Launched by `benchmarks/gpu_sharded.sh` once per stage and accelerate config:

    accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml --num_processes 1 \
        benchmarks/sharded_check.py --stage pmtp --checkpoint CKPT --out OUT.json

Every stage starts from `--checkpoint` (a tiny Janus checkpoint: the point is the launch path, not the numbers). The
main process writes `--out`: the distributed type accelerate chose, the wrapper the trainer trains, whether every
parameter is an FSDP2 shard or which ZeRO stage DeepSpeed runs, the losses, the seconds and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import provenance

from echogen_rl.experiments.jobs import shapes_config
from echogen_rl.scripts.runner import run_recipe

STAGE_SETTINGS = {
    "pmtp": {"num_train_samples": 64, "per_device_train_batch_size": 4},
    "djo": {"num_train_samples": 32, "per_device_train_batch_size": 2, "loop_weight_warmup_steps": 0},
    "cyclerl": {"num_train_samples": 16, "per_device_train_batch_size": 4, "num_generations": 4},
}


def what_ran(trainer) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    state = trainer.accelerator.state
    deepspeed = getattr(state, "deepspeed_plugin", None)
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "num_processes": trainer.accelerator.num_processes,
        "wrapper": type(trainer.model_wrapped).__name__,
        "fsdp2": isinstance(trainer.model, FSDPModule),
        "every_parameter_sharded": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
        "zero_stage": deepspeed.zero_stage if deepspeed is not None else None,
        "mixed_precision": str(trainer.accelerator.mixed_precision),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=sorted(STAGE_SETTINGS), required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sharded-check-") as work:
        settings = {
            **STAGE_SETTINGS[args.stage],
            "model_name_or_path": args.checkpoint,
            "output_dir": work,
            "max_steps": args.steps,
            "logging_steps": 1,
            "save_strategy": "no",
            "eval_strategy": "no",
            "num_eval_samples": 0,
            "report_to": "none",
            "bf16": torch.cuda.is_available(),
        }
        trainer = run_recipe(args.stage, shapes_config(args.stage), settings)
        record = {
            "stage": args.stage,
            "config": f"recipes/configs/{args.stage}/shapes_tiny.yaml",
            **what_ran(trainer),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "seconds": time.perf_counter() - clock,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
    if trainer.accelerator.is_main_process:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**record, "provenance": provenance()}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
