"""A stage's real trainer for a few steps on two processes, under accelerate's FSDP2 path (`--fsdp`), its DeepSpeed
path (`--deepspeed`: ZeRO-2 or ZeRO-3) or plain DDP, so that the tests can compare them.

accelerate takes its FSDP branch only for GPU-type runs; on CPU processes it picks plain data parallelism. With
`--fsdp` this script changes only that choice, after accelerate's device check: the accelerator's state is set to
`DistributedType.FSDP` with an FSDP2 plugin, as a GPU run of `recipes/accelerate_configs/fsdp.yaml` would have it.
Everything after that (the trainer sharding its model with `shard_janus`, accelerate's prepare, the optimizer on
DTensors, gradient clipping, logging) is the real code path. Each rank writes `rank{r}.pt`: the logged losses, the
wrapper types, and the trainable weights after training, gathered whole.

DeepSpeed runs as a user runs it, under `accelerate launch --config_file recipes/accelerate_configs/zero3.yaml` (with
`DS_ACCELERATOR=cpu`, the test's process count and no mixed precision): accelerate then turns DeepSpeed on, and
DeepSpeed starts gloo over the processes, but accelerate's state, having found no backend of its own for CPU
processes, counts one process. With `--deepspeed` this script sets the state's process counts to torch.distributed's
before the training arguments are built (`count_processes`), and nothing else; the trainers refuse the uncounted state.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/scripts/sharded_trainer.py CKPT OUT --stage pmtp --fsdp
    DS_ACCELERATOR=cpu accelerate launch --config_file recipes/accelerate_configs/zero3.yaml --num_processes 2 \
        --mixed_precision no tests/scripts/sharded_trainer.py CKPT OUT --stage pmtp --deepspeed
"""

import argparse
import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from _dist import common_args
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from dist_cyclerl import build_trainer
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoTokenizer, JanusForConditionalGeneration, Trainer

from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.models.modeling import unwrap_janus
from echogen_rl.trainer.cyclerl_config import CycleRLConfig
from echogen_rl.trainer.cyclerl_trainer import CycleRLTrainer
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.djo_trainer import DJOTrainer
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer

FSDP_YAML = Path(__file__).resolve().parents[2] / "recipes" / "accelerate_configs" / "fsdp.yaml"
STAGES = {
    "pmtp": (PMTPTrainer, PMTPConfig, {"max_length": 1024}),
    # DJO's default loop image, as the shipped configs: the model's own sample, drawn mid-step (`gathered_root`).
    "djo": (DJOTrainer, DJOConfig, {}),
    # LoRA, a group of 4 split over the ranks, the disabled adapter as reference and grounder.
    "cyclerl": (CycleRLTrainer, CycleRLConfig, {"num_generations": 4, "beta": 0.04, "grounding_model": "reference"}),
    # Full fine-tuning: TRL builds a reference copy (KL and grounder) and prepares it for FSDP itself.
    "cyclerl-full": (
        CycleRLTrainer,
        CycleRLConfig,
        {"num_generations": 4, "beta": 0.04, "grounding_model": "reference"},
    ),
}


def fsdp2_state(trainer) -> None:
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    if getattr(state, "fsdp_plugin", None) is None:
        # The plugin of the shipped fsdp.yaml, as accelerate builds it from the config's fsdp_config.
        config = yaml.safe_load(FSDP_YAML.read_text())["fsdp_config"]
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=config["fsdp_version"],
            reshard_after_forward=config["fsdp_reshard_after_forward"],
            state_dict_type=config["fsdp_state_dict_type"],
        )
    trainer.is_fsdp_enabled = True


def force_fsdp2() -> None:
    original = Trainer.create_accelerator_and_postprocess

    def create(self):
        original(self)
        fsdp2_state(self)

    Trainer.create_accelerator_and_postprocess = create


def count_processes(state) -> int:
    """accelerate's state under `accelerate launch` with a DeepSpeed config on CPU processes: DeepSpeed is on, over
    gloo, but the state counts one process. Sets its counts to torch.distributed's; returns the count it found."""
    assert os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and state.distributed_type == DistributedType.DEEPSPEED
    found = state.num_processes
    state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
    state.local_process_index = int(os.environ["LOCAL_RANK"])
    return found


def trainable_weights(model) -> dict[str, torch.Tensor]:
    """The trainable weights, gathered whole from their shards (a collective under FSDP2 and ZeRO-3)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitions
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in named])
    with gathered:
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in named}


def deepspeed_record(engine) -> dict:
    """What ran under `--deepspeed`: DeepSpeed's engine, its ZeRO stage and optimizer, and (ZeRO-3) each rank's share
    of the weights."""
    params = list(engine.module.parameters())
    record = {"zero_stage": engine.zero_optimization_stage(), "optimizer": type(engine.optimizer).__name__}
    if record["zero_stage"] == 3:
        record["local_numel"] = sum(p.ds_tensor.numel() for p in params)
        record["full_numel"] = sum(p.ds_numel for p in params)
        record["tensors"] = len(params)
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument(
        "--deepspeed", action="store_true", help="under accelerate launch with zero2.yaml or zero3.yaml"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-steps", type=int, help="write a checkpoint every this many steps")
    parser.add_argument("--resume", help="resume from this checkpoint folder (`resume_from_checkpoint`)")
    parser.add_argument("--export", help="after training, `trainer.save_model` to this folder")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as the 7B configs train")
    args = parser.parse_args()
    if args.fsdp:
        force_fsdp2()
    trainer_cls, config_cls, extra = STAGES[args.stage]
    shared = common_args(argparse.Namespace(out_dir=args.out_dir, steps=args.steps, gradient_accumulation_steps=1))
    if args.save_steps:
        shared |= {"save_strategy": "steps", "save_steps": args.save_steps}
    if args.gradient_checkpointing:
        shared |= {"gradient_checkpointing": True}
    if args.deepspeed:
        # Counted before the config is built (TRL's GRPOConfig sizes its generation batch by the process count),
        # which then keeps the state (`use_configured_state`); accelerate's DeepSpeed path needs `use_cpu` off.
        counted = count_processes(PartialState())
        shared |= {"use_cpu": False, "accelerator_config": {"use_configured_state": True}}
    config = config_cls(**shared, per_device_train_batch_size=2, **extra)
    model = JanusForConditionalGeneration.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    if args.stage.startswith("cyclerl"):
        trainer = build_trainer(trainer_cls, model, config, tokenizer, lora=args.stage == "cyclerl")
    else:
        trainer = trainer_cls(
            model, config, train_dataset=build_shapes_dataset(32, seed=0), processing_class=tokenizer
        )
    before = trainable_weights(trainer.model)
    torch.manual_seed(0)  # DJO's teacher-forced Gumbel noise comes from the global generator
    if args.fsdp:
        # CycleRL's set-up leaves the distributed type as the CPU chose it (observed): choose FSDP once more.
        fsdp2_state(trainer)
    trainer.train(resume_from_checkpoint=args.resume)
    after = trainable_weights(trainer.model)
    if args.export:
        trainer.save_model(args.export)
    rank = dist.get_rank()
    record = {
        "rank": rank,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "wrapped": type(trainer.model_wrapped).__name__,
        "fsdp2": isinstance(trainer.model, FSDPModule),
        "sharded": all(isinstance(p, DTensor) for p in trainer.model.parameters()),
        "checkpointing": getattr(unwrap_janus(trainer.model), "is_gradient_checkpointing", False),
        "reference": None if getattr(trainer, "ref_model", None) is None else type(trainer.ref_model).__name__,
        **({"accelerate_counted": counted, **deepspeed_record(trainer.model_wrapped)} if args.deepspeed else {}),
        "before": before,
        "after": after,
    }
    torch.save(record, Path(args.out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
