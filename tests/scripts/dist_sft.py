"""PMTP or DJO on two processes (tests/test_distributed.py): a few steps on the tiny checkpoint and shapes data.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/scripts/dist_sft.py CHECKPOINT OUT_DIR --stage {pmtp,djo}

Each rank also records its first micro-batch and the teacher-forced loss it computed on it, which the test
recomputes in one fp32 process (with `--mixed_precision bf16` the ranks compute under bf16 autocast).
"""

import sys

from _dist import common_args, fingerprint, parse_args, trainable, write_rank
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.trainer.djo_config import DJOConfig
from echogen_rl.trainer.djo_trainer import DJOTrainer
from echogen_rl.trainer.pmtp_config import PMTPConfig
from echogen_rl.trainer.pmtp_trainer import PMTPTrainer

# stage -> (trainer, config class, stage-specific config, the batch key to fingerprint)
STAGES = {
    "pmtp": (PMTPTrainer, PMTPConfig, {"max_length": 1024}, "input_ids"),
    "djo": (DJOTrainer, DJOConfig, {"loop_weight": 0.5}, "l2i_input_ids"),
}


def main():
    at = sys.argv.index("--stage")
    stage = sys.argv[at + 1]
    del sys.argv[at : at + 2]
    trainer_cls, config_cls, extra, key = STAGES[stage]
    args = parse_args()
    batches, losses, first = [], [], {}

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
            batches.append(fingerprint(inputs[key]))
            losses.append(loss.item())
            if not first:
                # The deterministic part: PMTP's loss, DJO's teacher-forced L2I loss (the loop loss draws noise).
                part = out.l2i.loss if stage == "djo" else loss
                first.update(
                    batch={k: v.cpu() for k, v in inputs.items()},
                    loss=part.item(),
                )
            return (loss, out) if return_outputs else loss

    model = JanusForConditionalGeneration.from_pretrained(args.checkpoint)
    # The dtype the language model computes in (accelerate applies autocast around the model's forward).
    matmul_dtypes = set()
    attention = model.model.language_model.layers[0].self_attn.q_proj
    attention.register_forward_hook(lambda module, args, out: matmul_dtypes.add(str(out.dtype)))
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    config = config_cls(**common_args(args), per_device_train_batch_size=2, **extra)
    trainer = Recording(model, config, train_dataset=build_shapes_dataset(32, seed=0), processing_class=tokenizer)
    before = trainable(trainer.model)  # after the trainer froze what no loss reads
    trainer.train()
    write_rank(trainer, args.out_dir, before, batches=batches, losses=losses, first=first, matmul_dtypes=matmul_dtypes)


if __name__ == "__main__":
    main()
