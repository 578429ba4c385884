"""Every `echogen-rl eval --benchmark` path at real size, on any device: a random-init checkpoint of a shipped
architecture (default Janus-Pro-1B: 576 codes, its VQ decoder at 384 px) runs COCO (the in-model grounder as
detector), LayoutSAM-Eval (the tiny random judge) and referring-expression grounding on NUM sample layouts in the
official formats, with FID by a small stand-in extractor. Nothing is downloaded, so no YOLO, MiniCPM-V or Inception
weights: this proves the generation, detection, judging, FID and grounding paths run where they will run (device,
dtype, real sizes), not the scores, which measure nothing. JSON out: per benchmark its seconds, items and results.

    python benchmarks/paper_eval_check.py --device cuda --num 16 --out benchmarks/results/gpu_paper_eval.json
    python benchmarks/paper_eval_check.py --device cpu --num 1 --dtype float32   # the CPU proof (minutes)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import provenance

from echogen_rl.eval.benchmarks.runner import run_benchmark
from echogen_rl.eval.benchmarks.samples import write_sample_benchmarks
from echogen_rl.models.architectures import Architecture, load_architecture, write_random_checkpoint


class PixelStatistics(torch.nn.Module):
    """A stand-in FID extractor: per-channel pixel means and standard deviations (no weights to download)."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.double() / 255
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="janus_pro_1b", help="a shipped architecture")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="stored (and so loaded) dtype; default the architecture's")
    parser.add_argument("--num", type=int, default=16, help="layouts per benchmark")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="outputs/paper_eval_check.json")
    args = parser.parse_args()

    config = load_architecture(args.architecture)
    if args.dtype is not None:
        config.dtype = args.dtype
    report = {"architecture": args.architecture, "device": args.device, "num": args.num, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clock = time.perf_counter()
        model = write_random_checkpoint(Architecture(config, args.architecture), work / "checkpoint")
        report["checkpoint_seconds"] = time.perf_counter() - clock
        samples = write_sample_benchmarks(work / "samples", args.num)
        common = {"limit": args.num, "batch_size": args.batch_size, "device": args.device}
        runs = {
            "coco": {k: samples[k] for k in ("instances", "captions", "image_dir")} | {"detector": "grounder"},
            "layoutsam": {"rows": samples["rows"], "judge": samples["judge"]},
            "refexp": {"refs": samples["refs"], "image_dir": samples["image_dir"]},
        }
        for name, files in runs.items():
            fid = {"fid_extractor": PixelStatistics(), "fid_resolution": 64} if name != "refexp" else {}
            clock = time.perf_counter()
            result = run_benchmark(name, str(model), work / name, **files, **fid, **common)
            seconds = time.perf_counter() - clock
            report["runs"][name] = {"seconds": seconds, "items": result["items"], "results": result["results"]}
            print(f"{name}: {result['items']} items in {seconds:.1f} s", flush=True)
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
        report["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    report["provenance"] = provenance()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
