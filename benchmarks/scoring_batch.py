"""Seconds to score the study's held-out layouts (generate greedily, then ground) per batch size, against batch 64.

The study generates and grounds its layouts in batches (`echogen_rl.experiments.study_scoring.SCORING_BATCH`); at the tiny model's
size a decoding step costs mostly per-call overhead, so larger batches take fewer steps in all. Greedy codes and
groundings must not depend on the batch size: `same_as_baseline` checks both. Medians of `--repeats` runs, one
thread (the study scores on one), in one process; JSON keys `generate_ratio_vs_64`, `ground_ratio_vs_64`.

    python benchmarks/scoring_batch.py --model outputs/study/seed0/djo --out outputs/bench/scoring_batch.json

Without `--model` it times a randomly initialized tiny model, whose grounder never ends an answer early.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import checkpoint, environment, median_seconds, randomize_, write_json
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import ShapesConfig
from echogen_rl.eval.inference import generate_images
from echogen_rl.experiments.study_scoring import study_layouts
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.prompts import PromptBuilder

BASELINE = 64


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--model", default=None, help="a trained shapes checkpoint (default: a random tiny model)")
    parser.add_argument("--layouts", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if BASELINE not in args.batches:
        args.batches.insert(0, BASELINE)

    with tempfile.TemporaryDirectory() as root:
        path = Path(args.model) if args.model else checkpoint("tiny", Path(root))
        model = JanusForConditionalGeneration.from_pretrained(path).eval()
        if not args.model:
            randomize_(model)
        tokenizer = AutoTokenizer.from_pretrained(path)
    targets, _ = study_layouts("held_out", args.layouts, ShapesConfig())
    phrases = [t.phrases for t in targets]
    prompts = PromptBuilder(tokenizer, model.config.vision_config.num_image_tokens)

    def generate(batch):
        return generate_images(model, tokenizer, targets, guidance_scale=1.0, temperature=0.0, batch_size=batch)

    rows, baseline = {}, None
    for batch in args.batches:
        codes = generate(batch)
        texts = [g.text for g in Grounder(model, prompts, batch)(codes, phrases)]
        if baseline is None and batch == BASELINE:
            baseline = (codes, texts)
        t_generate, _ = median_seconds(lambda b=batch: generate(b), args.repeats, warmup=0)
        t_ground, _ = median_seconds(lambda b=batch, c=codes: Grounder(model, prompts, b)(c, phrases), args.repeats, 0)
        rows[batch] = {"generate_s": t_generate, "ground_s": t_ground, "codes": codes, "texts": texts}
    result = {
        "benchmark": "scoring_batch",
        "environment": environment(),
        "model": str(args.model) if args.model else "random tiny",
        "layouts": args.layouts,
        "batches": {},
    }
    base = rows[BASELINE]
    for batch, row in rows.items():
        result["batches"][str(batch)] = {
            "generate_s": row["generate_s"],
            "ground_s": row["ground_s"],
            "generate_ratio_vs_64": base["generate_s"] / row["generate_s"],
            "ground_ratio_vs_64": base["ground_s"] / row["ground_s"],
            "same_as_baseline": bool(torch.equal(row["codes"], baseline[0])) and row["texts"] == baseline[1],
        }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
