"""Useful tokens/s of a packed PMTP training step vs the same samples as two separately padded task batches.

Same model, same samples, forward + backward. Samples follow LayoutSAM's length distribution: 1..10
entities, captions of 10..60 words, 576 codes per image (24 x 24). "Useful" tokens are the non-padding
ones; both sides process the same useful tokens, so the ratio is the ratio of step times.
Medians of `--repeats` steps after a warm-up, in one process; JSON key `ratio_vs_unpacked`.

    python benchmarks/pmtp_packing.py --out outputs/bench/pmtp_packing.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import environment, median_seconds, write_json
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.collators import PMTPCollator
from echogen_rl.data.shapes import phrase_pool
from echogen_rl.layout import Entity, Layout
from echogen_rl.models.modeling import masked_cross_entropy, mixed_forward
from echogen_rl.models.palette import CAPTION_WORDS
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.models.tiny import TinyJanusConfig, build_tiny_checkpoint
from echogen_rl.trainer.pmtp_trainer import pmtp_losses


def layoutsam_like_examples(n: int, n_codes: int, codebook: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    pool = phrase_pool()
    examples = []
    for _ in range(n):
        k = int(rng.integers(1, 11))
        entities = []
        for _ in range(k):
            x1, y1 = rng.uniform(0, 0.7, 2)
            w, h = rng.uniform(0.1, 0.3, 2)
            entities.append(Entity(str(rng.choice(pool)), (x1, y1, x1 + w, y1 + h)))
        caption = " ".join(rng.choice(CAPTION_WORDS, int(rng.integers(10, 61))))
        examples.append(
            {
                "caption": caption,
                "layout": Layout(entities, caption).to_json(),
                "image_codes": rng.integers(0, codebook, n_codes).tolist(),
            }
        )
    return examples


def unpacked_step(model, prompts: PromptBuilder, examples: list[dict]) -> torch.Tensor:
    """The baseline: an L2I batch and an I2L batch, each right-padded, two forwards."""
    collator = PMTPCollator(prompts)
    pairs = [collator.segments(e, i) for i, e in enumerate(examples)]
    loss = 0.0
    for task in (0, 1):
        b = pad_segments([p[task] for p in pairs], prompts.pad_id, "right")
        hidden = mixed_forward(model, b["input_ids"], b["image_mask"], b["attention_mask"])
        loss = (
            loss
            + masked_cross_entropy(
                model, hidden, b["image_labels" if task == 0 else "text_labels"], "image" if task == 0 else "text"
            ).loss
        )
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step")
    parser.add_argument("--max-length", type=int, default=16384, help="tokens per packed row")
    parser.add_argument("--block-mask", action="store_true", help="dense 4D block mask instead of segment attention")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = TinyJanusConfig(
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=4,
        intermediate_size=2 * args.hidden_size,
        grid_size=24,
        codebook_size=1024,
        max_position_embeddings=2048,
    )
    with tempfile.TemporaryDirectory() as root:
        path = build_tiny_checkpoint(Path(root) / "ckpt", config)
        model = JanusForConditionalGeneration.from_pretrained(path).train()
        tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = PromptBuilder(tokenizer, 576)
    examples = layoutsam_like_examples(args.batch_size, 576, 1024)
    packed_batch = PMTPCollator(prompts, args.max_length)(examples)
    useful = int((packed_batch["segment_ids"] >= 0).sum())

    def packed():
        out = pmtp_losses(model, packed_batch, segment_attention=not args.block_mask)
        (out["img"].loss + out["text"].loss).backward()

    def unpacked():
        unpacked_step(model, prompts, examples).backward()

    t_packed, _ = median_seconds(packed, args.repeats)
    t_unpacked, _ = median_seconds(unpacked, args.repeats)
    pairs = [PMTPCollator(prompts).segments(e, i) for i, e in enumerate(examples)]
    padded = sum(args.batch_size * max(len(p[t]) for p in pairs) for t in (0, 1))
    result = {
        "benchmark": "pmtp_packing",
        "environment": environment(),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "attention": "block_mask" if args.block_mask else "segments",
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "useful_tokens": useful,
        "packed_rows": list(packed_batch["input_ids"].shape),
        "packed_fill": useful / packed_batch["input_ids"].numel(),
        "unpacked_fill": useful / padded,
        "packed_tokens_per_s": useful / t_packed,
        "unpacked_tokens_per_s": useful / t_unpacked,
        "ratio_vs_unpacked": t_unpacked / t_packed,
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
