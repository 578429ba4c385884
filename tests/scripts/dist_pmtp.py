"""PMTP on two processes (tests/test_distributed.py): a few steps on the tiny checkpoint and shapes data.

    ACCELERATE_USE_CPU=true python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no tests/scripts/dist_pmtp.py CHECKPOINT OUT_DIR
"""

from _dist import common_args, fingerprint, parse_args, trainable, write_rank
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import build_shapes_dataset
from echogen_rl.pmtp_config import PMTPConfig
from echogen_rl.pmtp_trainer import PMTPTrainer


class RecordingPMTPTrainer(PMTPTrainer):
    batches: list[int] = []
    losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.batches.append(fingerprint(inputs["input_ids"]))
        self.losses.append(loss.item())
        return loss


def main():
    args = parse_args()
    model = JanusForConditionalGeneration.from_pretrained(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    config = PMTPConfig(**common_args(args), per_device_train_batch_size=2, max_length=1024)
    trainer = RecordingPMTPTrainer(
        model, config, train_dataset=build_shapes_dataset(32, seed=0), processing_class=tokenizer
    )
    before = trainable(trainer.model)  # after the trainer froze what no loss reads
    trainer.train()
    write_rank(trainer, args.out_dir, before, batches=trainer.batches, losses=trainer.losses)


if __name__ == "__main__":
    main()
