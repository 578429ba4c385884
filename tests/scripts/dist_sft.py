"""PMTP or DJO on two processes (tests/test_distributed.py): a few steps on the tiny checkpoint and shapes data.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/scripts/dist_sft.py CHECKPOINT OUT_DIR --stage {pmtp,djo}
"""

import sys

from _dist import common_args, fingerprint, parse_args, trainable, write_rank
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.djo_config import DJOConfig
from echogen_rl.djo_trainer import DJOTrainer
from echogen_rl.pmtp_config import PMTPConfig
from echogen_rl.pmtp_trainer import PMTPTrainer

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
    batches, losses = [], []

    class Recording(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            batches.append(fingerprint(inputs[key]))
            losses.append(loss.item())
            return loss

    model = JanusForConditionalGeneration.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    config = config_cls(**common_args(args), per_device_train_batch_size=2, **extra)
    trainer = Recording(model, config, train_dataset=build_shapes_dataset(32, seed=0), processing_class=tokenizer)
    before = trainable(trainer.model)  # after the trainer froze what no loss reads
    trainer.train()
    write_rank(trainer, args.out_dir, before, batches=batches, losses=losses)


if __name__ == "__main__":
    main()
