"""`echogen-rl <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys


def _init_tiny(args: argparse.Namespace) -> int:
    from .tiny import TinyJanusConfig, build_tiny_checkpoint

    config = TinyJanusConfig(
        hidden_size=args.hidden_size, num_layers=args.num_layers, grid_size=args.grid_size, seed=args.seed
    )
    out = build_tiny_checkpoint(args.output_dir, config, overwrite=args.overwrite)
    print(f"tiny Janus checkpoint written to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoBudget, run_demo

    run_demo(args.output_dir, overwrite=args.overwrite, budget=DemoBudget.quick() if args.quick else None)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluation import run_eval

    run_eval(
        args.model,
        args.output_dir,
        adapter=args.adapter,
        dataset=args.dataset,
        num_layouts=args.num_layouts,
        detector=args.detector,
        overwrite=args.overwrite,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        device=args.device,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echogen-rl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-tiny", help="write the offline tiny Janus checkpoint to OUTPUT_DIR")
    p.add_argument("output_dir")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--grid-size", type=int, default=8, help="image codes per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.set_defaults(func=_init_tiny)

    p = sub.add_parser("demo", help="the offline CPU demo on the shapes world")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, learns nothing")
    p.set_defaults(func=_demo)

    p = sub.add_parser("eval", help="evaluate L2I and I2L on held-out layouts; writes eval.json and eval.png")
    p.add_argument("--model", required=True, help="Janus checkpoint directory or hub id")
    p.add_argument("--adapter", help="PEFT adapter directory, merged into the model")
    p.add_argument("--dataset", default="shapes", choices=["shapes"])
    p.add_argument("--num-layouts", type=int, default=64)
    p.add_argument(
        "--detector",
        default="oracle",
        help="oracle, grounder, or a COCO results JSON of your detector run on OUTPUT_DIR/images from an earlier "
        "run with the same seed (image ids 1..N, category ids number the shapes phrases from 1)",
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the report and pictures in OUTPUT_DIR")
    p.add_argument("--seed", type=int, default=0, help="held-out layouts and generation seed")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=16, help="layouts per rollout (changes the sampled images)")
    p.add_argument("--device", help="defaults to cuda when available, else cpu")
    p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"echogen-rl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
