"""Images/s of the batched grounder vs transformers' `generate` called per image.

As the reward uses it: K = 4 phrases per image, 16 images, greedy, the same decoding bound for both.
Query strategy: one query listing all phrases (the trained format; see echogen_rl/models/grounding.py).
Medians of `--repeats` runs after a warm-up, in one process; JSON key `ratio_vs_naive`.

    python benchmarks/grounding.py --out outputs/bench/grounding.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import checkpoint, environment, median_seconds, randomize_, write_json
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import phrase_pool
from echogen_rl.models.grounding import Grounder
from echogen_rl.models.modeling import embed_mixed
from echogen_rl.models.prompts import PromptBuilder, pad_segments


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--phrases", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as root:
        path = checkpoint(args.config, Path(root))
        model = randomize_(JanusForConditionalGeneration.from_pretrained(path)).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    n_codes = model.config.vision_config.num_image_tokens
    prompts = PromptBuilder(tokenizer, n_codes)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, model.config.vq_config.num_embeddings, (args.num_images, n_codes), generator=gen)
    pool = phrase_pool()
    phrases = [[pool[(7 * i + j) % len(pool)] for j in range(args.phrases)] for i in range(args.num_images)]
    grounder = Grounder(model, prompts, batch_size=args.num_images)
    budget = grounder.answer_budget(phrases[0])

    def naive():
        texts = []
        for row, query in zip(codes.tolist(), phrases):
            seg = prompts.i2l_prefix(row)
            seg.add_text(prompts.i2l_query_ids(query))
            b = pad_segments([seg], prompts.pad_id)
            with torch.no_grad():
                out = model.generate(
                    inputs_embeds=embed_mixed(model, b["input_ids"], b["image_mask"]),
                    attention_mask=b["attention_mask"],
                    max_new_tokens=budget,
                    do_sample=False,
                    eos_token_id=prompts.eos_id,
                    pad_token_id=prompts.pad_id,
                )[0].tolist()
            out = out[: out.index(prompts.eos_id)] if prompts.eos_id in out else out
            texts.append(tokenizer.decode(out, skip_special_tokens=True))
        return texts

    parity = [r.text for r in grounder(codes, phrases)] == naive()
    t_ours, _ = median_seconds(lambda: grounder(codes, phrases), args.repeats)
    t_naive, _ = median_seconds(naive, args.repeats)
    result = {
        "benchmark": "grounding",
        "environment": environment(),
        "config": args.config,
        "num_images": args.num_images,
        "phrases_per_image": args.phrases,
        "max_new_tokens": budget,
        "query_strategy": "one query listing all phrases, image prefix prefilled once per image",
        "parity_text": parity,
        "grounder_images_per_s": args.num_images / t_ours,
        "naive_images_per_s": args.num_images / t_naive,
        "ratio_vs_naive": t_naive / t_ours,
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
