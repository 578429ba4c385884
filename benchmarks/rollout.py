"""Images/s of the torch rollout engine vs transformers' `generate(generation_mode="image")`.

Same model, same prompts, batch 8, CFG 5, greedy; medians of `--repeats` runs after a warm-up, in one
process. Writes JSON (`--out`) with, per config, the parity of the greedy codes and the ratio.

    python benchmarks/rollout.py --out outputs/bench/rollout.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import CONFIGS, checkpoint, environment, median_seconds, randomize_, write_json
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import ShapesConfig, sample_shapes
from echogen_rl.prompts import PromptBuilder, pad_segments
from echogen_rl.rollout.torch_engine import TorchRolloutEngine


def bench_config(name: str, root: Path, batch_size: int, repeats: int) -> dict:
    path = checkpoint(name, root)
    model = randomize_(JanusForConditionalGeneration.from_pretrained(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    n_codes = model.config.vision_config.num_image_tokens
    prompts = PromptBuilder(tokenizer, n_codes)
    # Prompts of one length (no padding): transformers numbers padded positions differently (see the engine).
    layout = sample_shapes(0, ShapesConfig()).layout
    batch = pad_segments([prompts.l2i_prompt(layout)] * batch_size, prompts.pad_id, "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)

    def hf():
        return model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=5.0)

    eager = TorchRolloutEngine(model, n_codes, *special)
    compiled = TorchRolloutEngine(model, n_codes, *special, compile=True)
    start = time.perf_counter()
    compiled_codes = compiled.generate(ids, mask, 5.0, temperature=0).codes
    compile_s = time.perf_counter() - start

    hf_codes = hf()
    eager_codes = eager.generate(ids, mask, 5.0, temperature=0).codes
    t_hf, _ = median_seconds(hf, repeats)
    t_eager, _ = median_seconds(lambda: eager.generate(ids, mask, 5.0, temperature=0), repeats)
    t_comp, _ = median_seconds(lambda: compiled.generate(ids, mask, 5.0, temperature=0), repeats)
    return {
        "num_image_tokens": n_codes,
        "hidden_size": model.config.text_config.hidden_size,
        "num_layers": model.config.text_config.num_hidden_layers,
        "batch_size": batch_size,
        "parity_greedy": bool(torch.equal(eager_codes, hf_codes) and torch.equal(compiled_codes, hf_codes)),
        "distinct_codes": len(set(hf_codes.flatten().tolist())),
        "engine_images_per_s": batch_size / t_comp,
        "engine_eager_images_per_s": batch_size / t_eager,
        "hf_images_per_s": batch_size / t_hf,
        "ratio_vs_hf": t_hf / t_comp,
        "ratio_eager_vs_hf": t_hf / t_eager,
        "compile_s": compile_s,
        "engine": "compiled (static cache, torch.compile)",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        configs = {name: bench_config(name, Path(root), args.batch_size, args.repeats) for name in args.configs}
    write_json({"benchmark": "rollout", "environment": environment(), "configs": configs}, args.out)


if __name__ == "__main__":
    main()
