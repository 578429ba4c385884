"""Images/s of the rollout engines: the torch engine, transformers' `generate(generation_mode="image")`, and the
vLLM engine where vLLM is installed (`make install-vllm`, then run this with .venv-vllm/bin/python).

Same model, same prompts, CFG 5, greedy; medians of `--repeats` runs after a warm-up, in one process. Writes JSON
(`--out`) with, per config, the parity of the greedy codes and the ratios.

    python benchmarks/rollout.py --out outputs/bench/rollout.json
    .venv-vllm/bin/python benchmarks/rollout.py --configs tiny small large --out outputs/bench/rollout_vllm.json
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch
from common import CONFIGS, DTYPES, checkpoint, environment, median_seconds, randomize_, write_json
from transformers import AutoTokenizer, JanusForConditionalGeneration

from echogen_rl.data.shapes import ShapesConfig, sample_shapes
from echogen_rl.models.prompts import PromptBuilder, pad_segments
from echogen_rl.rollout.torch_engine import TorchRolloutEngine


def equal_prefix(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of each row's codes before the first difference (1.0: identical)."""
    same = (a == b).long().cumprod(dim=1)
    return float(same.sum(1).float().mean() / a.shape[1])


def bench_vllm(model, prompts, ids, mask, n_codes, batch_size, repeats, reference_codes, t_torch, dtype) -> dict:
    from echogen_rl.rollout.vllm_engine import VLLMRolloutEngine

    start = time.perf_counter()
    engine = VLLMRolloutEngine(
        model,
        n_codes,
        prompts.bos_id,
        prompts.boi_id,
        prompts.pad_id,
        dtype=dtype,
        max_num_seqs=batch_size,
        kv_cache_gib=1.0,
        enforce_eager=True,
        max_model_len=ids.shape[1] + n_codes,
    )
    start_s = time.perf_counter() - start
    codes = engine.generate(ids, mask, 5.0, temperature=0).codes
    t_vllm, _ = median_seconds(lambda: engine.generate(ids, mask, 5.0, temperature=0), repeats)
    sync = [engine.sync_weights(model) and engine.last_sync_s for _ in range(3)]
    engine.close()
    return {
        "images_per_s": batch_size / t_vllm,
        "ratio_vs_torch": t_torch / t_vllm,
        "parity_greedy": bool(torch.equal(codes, reference_codes)),
        "equal_prefix": equal_prefix(codes, reference_codes),
        "start_s": start_s,
        "sync_s": sorted(sync)[1],
    }


def bench_config(
    name: str, root: Path, batch_size: int, repeats: int, engines: list[str], compile: bool, dtype: str | None
) -> dict:
    path = checkpoint(name, root)
    dtype = getattr(torch, dtype) if dtype else DTYPES.get(name, torch.float32)
    model = randomize_(JanusForConditionalGeneration.from_pretrained(path)).eval().to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    n_codes = model.config.vision_config.num_image_tokens
    prompts = PromptBuilder(tokenizer, n_codes)
    # Prompts of one length (no padding): transformers numbers padded positions differently (see the engine).
    layout = sample_shapes(0, ShapesConfig()).layout
    batch = pad_segments([prompts.l2i_prompt(layout)] * batch_size, prompts.pad_id, "left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = (prompts.bos_id, prompts.boi_id, prompts.pad_id)
    result = {
        "num_image_tokens": n_codes,
        "hidden_size": model.config.text_config.hidden_size,
        "num_layers": model.config.text_config.num_hidden_layers,
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
    }

    eager = TorchRolloutEngine(model, n_codes, *special)
    eager_codes = eager.generate(ids, mask, 5.0, temperature=0).codes
    t_eager, _ = median_seconds(lambda: eager.generate(ids, mask, 5.0, temperature=0), repeats)
    result["engine_eager_images_per_s"] = batch_size / t_eager
    result["distinct_codes"] = len(set(eager_codes.flatten().tolist()))
    t_torch = t_eager
    if compile:
        compiled = TorchRolloutEngine(model, n_codes, *special, compile=True)
        start = time.perf_counter()
        compiled_codes = compiled.generate(ids, mask, 5.0, temperature=0).codes
        result["compile_s"] = time.perf_counter() - start
        t_comp, _ = median_seconds(lambda: compiled.generate(ids, mask, 5.0, temperature=0), repeats)
        result["engine_images_per_s"] = batch_size / t_comp
        result["parity_compiled_eager"] = bool(torch.equal(compiled_codes, eager_codes))
        t_torch = t_comp
    result["torch_engine"] = "compiled (static cache, torch.compile)" if compile else "eager (static cache)"
    if "hf" in engines:

        def hf():
            return model.generate(
                ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=5.0
            )

        hf_codes = hf()
        t_hf, _ = median_seconds(hf, repeats)
        result["hf_images_per_s"] = batch_size / t_hf
        result["ratio_vs_hf"] = t_hf / t_torch
        result["ratio_eager_vs_hf"] = t_hf / t_eager
        result["parity_greedy"] = bool(torch.equal(eager_codes, hf_codes))
    if "vllm" in engines:
        result["vllm"] = bench_vllm(
            model, prompts, ids, mask, n_codes, batch_size, repeats, eager_codes, t_torch, dtype
        )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(CONFIGS))
    have_vllm = importlib.util.find_spec("vllm") is not None
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["hf", "vllm"] if have_vllm else ["hf"],
        choices=["hf", "vllm"],
        help="engines compared with the torch engine (default: hf, and vllm where installed)",
    )
    parser.add_argument("--no-compile", action="store_true", help="time the eager torch engine only")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: per config")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        configs = {
            name: bench_config(
                name, Path(root), args.batch_size, args.repeats, args.engines, not args.no_compile, args.dtype
            )
            for name in args.configs
        }
    write_json({"benchmark": "rollout", "environment": environment(), "configs": configs}, args.out)


if __name__ == "__main__":
    main()
