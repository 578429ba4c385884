"""The vLLM engine on a GPU, at Janus-Pro-1B size: greedy parity with the torch engine, and both engines' images/s.

Random-init Janus-Pro-1B (bf16, 576 codes, CFG 5); prompts of mixed lengths, left-padded. Writes JSON (`--out`).
Run by `benchmarks/gpu_check.sh`, which installs the GPU extra first.

    python benchmarks/gpu_vllm_check.py --out benchmarks/results/gpu_vllm/check.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import environment, median_seconds, write_json
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import ShapesConfig, sample_shapes
from echogen_rl.models.architectures import resolve_architecture, write_random_checkpoint
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.rollout.torch_engine import TorchRolloutEngine
from echogen_rl.rollout.vllm_engine import VLLMRolloutEngine


def equal_prefix(a: torch.Tensor, b: torch.Tensor) -> float:
    same = (a == b).long().cumprod(dim=1)
    return float(same.sum(1).float().mean() / a.shape[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()
    device = torch.device("cuda")
    result = {"benchmark": "gpu_vllm_check", "environment": environment(), "device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as root:
        path = write_random_checkpoint(resolve_architecture("", architecture="janus_pro_1b"), Path(root) / "janus")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = JanusForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        n_codes = model.config.vision_config.num_image_tokens
        prompts = PromptBuilder(tokenizer, n_codes)
        special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)
        layouts = [sample_shapes(seed, ShapesConfig()).layout for seed in range(max(args.batch_sizes))]

        def batch(size):
            b = pad_segments([prompts.l2i_prompt(lay) for lay in layouts[:size]], prompts.pad_id, "left")
            return b["input_ids"].to(device), b["attention_mask"].to(device)

        torch_engine = TorchRolloutEngine(model, n_codes, *special)
        start = time.perf_counter()
        vllm_engine = VLLMRolloutEngine(
            model,
            n_codes,
            *special,
            max_num_seqs=max(args.batch_sizes),
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=1024,
        )
        result["vllm_start_s"] = time.perf_counter() - start
        ids, mask = batch(8)
        ours = vllm_engine.generate(ids, mask, 5.0, temperature=0).codes
        expected = torch_engine.generate(ids, mask, 5.0, temperature=0).codes
        result["greedy"] = {
            "num_image_tokens": n_codes,
            "parity": bool(torch.equal(ours, expected)),
            "equal_prefix": equal_prefix(ours, expected),
            "equal_positions": float((ours == expected).float().mean()),
        }
        result["sync_s"] = [vllm_engine.sync_weights(model) and vllm_engine.last_sync_s for _ in range(3)]
        result["throughput"] = {}
        for size in args.batch_sizes:
            ids, mask = batch(size)
            gen = torch.Generator(device=device).manual_seed(0)
            t_torch, _ = median_seconds(
                lambda ids=ids, mask=mask, gen=gen: torch_engine.generate(ids, mask, 5.0, generator=gen), args.repeats
            )
            t_vllm, _ = median_seconds(lambda ids=ids, mask=mask: vllm_engine.generate(ids, mask, 5.0), args.repeats)
            result["throughput"][str(size)] = {
                "torch_images_per_s": size / t_torch,
                "vllm_images_per_s": size / t_vllm,
                "ratio_vllm_vs_torch": t_torch / t_vllm,
            }
            write_json(result, args.out)  # what was measured survives a later timeout
        vllm_engine.close()
    write_json(result, args.out)


if __name__ == "__main__":
    main()
