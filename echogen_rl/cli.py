"""`echogen-rl <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path


def _init_tiny(args: argparse.Namespace) -> int:
    from echogen_rl.models.tiny import TinyJanusConfig, build_tiny_checkpoint

    config = TinyJanusConfig(
        hidden_size=args.hidden_size, num_layers=args.num_layers, grid_size=args.grid_size, seed=args.seed
    )
    out = build_tiny_checkpoint(args.output_dir, config, overwrite=args.overwrite)
    print(f"tiny Janus checkpoint written to {out}")
    return 0


def _study(args: argparse.Namespace) -> int:
    from echogen_rl.experiments.study import StudyBudget, run_study
    from echogen_rl.experiments.study_report import format_results

    budget = StudyBudget.quick() if args.quick else StudyBudget()
    if args.layouts is not None:
        budget.layouts = args.layouts
    world = {
        key: value
        for key, value in (("grid_size", args.grid_size), ("max_shapes", args.max_shapes))
        if value is not None
    }
    stages = tuple(args.stages) if args.stages else budget.stages
    budget = dataclasses.replace(budget, world={**budget.world, **world}, stages=stages)  # checks both
    report = run_study(
        args.output_dir, budget, split=args.split, seeds=args.seeds, workers=args.jobs, seed_set=args.seed_set
    )
    print(format_results(report, Path(args.output_dir)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from echogen_rl.experiments.demo import DemoBudget, format_stage_table, run_demo

    if args.quick and args.shipped:
        raise ValueError("--quick and --shipped are alternatives; give one of them")
    budget = DemoBudget.quick() if args.quick else DemoBudget.shipped() if args.shipped else DemoBudget()
    report = run_demo(args.output_dir, overwrite=args.overwrite, budget=budget, workers=args.jobs)
    out = Path(args.output_dir)
    print(format_stage_table(report["stages"]))
    print(f"report: {out / 'report.json'}; pictures: {out / 'pictures'} (green: target boxes, magenta: grounded)")
    print(f"{report['seconds']:.0f} s")
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    import signal

    from echogen_rl.experiments.dry_run import run_dry_run
    from echogen_rl.experiments.dry_run_report import format_report

    # A killed run must still remove its temporary checkpoint (GBs at real size): SIGTERM unwinds as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = run_dry_run(
        args.config,
        steps=args.steps,
        batch_size=args.batch_size,
        stage=args.stage,
        architecture=args.architecture,
        overrides=args.overrides,
        json_path=args.json,
        work_dir=args.work_dir,
        layers=args.layers,
    )
    print(format_report(report))
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.benchmark != "shapes":
        return _eval_benchmark(args)
    from echogen_rl.eval.evaluation import run_eval

    run_eval(
        args.model,
        args.output_dir,
        adapter=args.adapter,
        num_layouts=args.num_layouts,
        detector=args.detector or "oracle",
        overwrite=args.overwrite,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        device=args.device,
    )
    return 0


def _eval_benchmark(args: argparse.Namespace) -> int:
    from echogen_rl.eval.benchmarks.runner import run_benchmark
    from echogen_rl.eval.evaluation import format_table
    from echogen_rl.experiments.provenance import provenance

    report = run_benchmark(
        args.benchmark,
        args.model,
        args.output_dir,
        adapter=args.adapter,
        instances=args.instances,
        captions=args.captions,
        image_dir=args.image_dir,
        rows=args.rows,
        refs=args.refs,
        detector=args.detector,
        judge=args.judge,
        fid_weights=args.fid_weights,
        fid_resolution=args.fid_resolution,
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        palette=args.palette,
        device=args.device,
        overwrite=args.overwrite,
        provenance=provenance(),
    )
    print(format_table(report["results"]))
    print(report["table_row"])
    return 0


def _eval_samples(args: argparse.Namespace) -> int:
    from echogen_rl.eval.benchmarks.samples import write_sample_benchmarks

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to write the samples there")
    paths = write_sample_benchmarks(out, args.num_layouts)
    print("\n".join(f"{name:<10} {path}" for name, path in paths.items()))
    return 0


def _eval_table(args: argparse.Namespace) -> int:
    from echogen_rl.eval.benchmarks.report import paper_table, read_reports

    print(paper_table(read_reports(args.runs)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from echogen_rl.models.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output, merge=args.merge, overwrite=args.overwrite, base=args.base)
    print(f"{'merged model' if args.merge else 'export'} written to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from echogen_rl.eval.generate import read_layout, run_generate

    if args.layout is None and not args.box:
        raise ValueError('give a layout: --layout FILE.json, or --box "phrase:x1,y1,x2,y2" (repeatable)')
    if args.layout is not None and args.box:
        raise ValueError("--layout and --box are alternatives; give one of them")
    layout = read_layout(args.layout, args.caption, args.box)
    paths = run_generate(
        args.model,
        layout,
        args.out,
        adapter=args.adapter,
        num_images=args.num,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        palette=args.palette,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(f"images: {', '.join(str(p) for p in paths[:-1])}; grid with the layout: {paths[-1]}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from echogen_rl.trainer.callbacks import plot_runs

    if not args.out.endswith(".png"):
        raise ValueError(f"--out {args.out}: the plot is a PNG; end the name in .png")
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    print(f"curves of {len(args.runs)} runs: {plot_runs(args.runs, args.out)}")
    return 0


def _ground(args: argparse.Namespace) -> int:
    from echogen_rl.eval.generate import parse_phrases, run_ground

    phrases = None if args.detect else parse_phrases(args.phrases)
    result = run_ground(
        args.model, args.image, phrases, adapter=args.adapter, draw=args.draw, palette=args.palette, device=args.device
    )
    print(json.dumps(result, indent=2))
    return 0


def _add_init_tiny(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-tiny", help="write the offline tiny Janus checkpoint to OUTPUT_DIR")
    p.add_argument("output_dir")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--grid-size", type=int, default=8, help="image codes per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    p.set_defaults(func=_init_tiny)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the offline CPU demo on the shapes world")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, learns nothing")
    p.add_argument("--shipped", action="store_true", help="the shipped configs' full steps (about 25 minutes)")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default: one per core, at most 4)")
    p.set_defaults(func=_demo)


def _add_dry_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dry-run",
        help="a real-size step of a training config on a random-init model: time, tokens, memory, GPU estimate",
        description="Runs the config's own recipe for a few steps on a random-init checkpoint of its architecture "
        "(synthetic data where its data paths are absent) and estimates GPU memory per device at its batch. "
        "Config fields to override go after --, as on the recipe's command line.",
    )
    p.add_argument("--config", required=True, help="a stage's YAML config, e.g. recipes/configs/pmtp/*.yaml")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps to run")
    p.add_argument("--batch-size", type=int, default=1, help="per-device batch of the dry run (CycleRL: x2 groups)")
    p.add_argument("--stage", choices=["pmtp", "djo", "cyclerl"], help="by default from the config's folder or fields")
    p.add_argument(
        "--architecture",
        help="instead of following model_name_or_path: janus_pro_1b, janus_pro_7b, tiny, or a checkpoint/config.json",
    )
    p.add_argument("--json", help="also write the report to this JSON file")
    p.add_argument("--work-dir", help="where the temporary checkpoint, data and output go (default: the temp dir)")
    p.add_argument(
        "--layers",
        type=int,
        nargs=2,
        metavar=("K1", "K2"),
        help="run at two depths and extrapolate (e.g. 7B on a CPU)",
    )
    p.add_argument("overrides", nargs="*", help="config fields after --, e.g. -- --gradient_checkpointing false")
    p.set_defaults(func=_dry_run)


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="each stage against its controls, over several seeds, with confidence intervals (shapes world)",
    )
    p.add_argument("--output-dir", default="outputs/study", help="runs, scores, study.json and study.png")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per stage (default 3)")
    p.add_argument("--split", choices=("held_out", "validation"), default="held_out", help="layouts to score")
    p.add_argument(
        "--seed-set",
        choices=("a", "b"),
        default="a",
        help="training seeds and held-out layouts: 'b' replicates 'a' on disjoint ones (give it its own --output-dir)",
    )
    p.add_argument("--layouts", type=int, default=None, help="layouts scored (default 512)")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default: one per core, at most 4)")
    p.add_argument("--quick", action="store_true", help="a few steps per run: a pipeline check")
    p.add_argument("--grid-size", type=int, default=None, help="cells per image side of the shapes world (default 8)")
    p.add_argument("--max-shapes", type=int, default=None, help="most shapes per image (default 3)")
    p.add_argument(
        "--stages", nargs="+", choices=("djo", "cyclerl"), default=None, help="stages compared with their controls"
    )
    p.set_defaults(func=_study)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: on held-out shapes layouts (eval.json, eval.png), or on a published benchmark "
        "(--benchmark coco|layoutsam|refexp: report.json, report.md)",
    )
    p.add_argument("--model", required=True, help="Janus checkpoint directory or hub id")
    p.add_argument("--adapter", help="PEFT adapter directory, merged into the model")
    p.add_argument("--benchmark", default="shapes", choices=["shapes", "coco", "layoutsam", "refexp"])
    p.add_argument("--num-layouts", type=int, default=64, help="shapes: held-out layouts evaluated")
    p.add_argument(
        "--detector",
        help="shapes: oracle (default), grounder, or a COCO results JSON of your detector run on OUTPUT_DIR/images "
        "(image ids 1..N, category ids number the shapes phrases from 1). coco: yolo:WEIGHTS.pt, a COCO results "
        "JSON of the generated images, or grounder (the model's own, an offline check)",
    )
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace the run in OUTPUT_DIR instead of resuming it")
    p.add_argument("--seed", type=int, default=0, help="generation seed (shapes: also the held-out layouts)")
    p.add_argument(
        "--guidance-scale",
        type=float,
        help="CFG scale; defaults to the checkpoint's (1 when it trained no CFG branch)",
    )
    p.add_argument("--temperature", type=float, help="benchmarks: 0 decodes greedily; defaults to the checkpoint's")
    p.add_argument("--batch-size", type=int, default=16, help="layouts per rollout (changes the sampled images)")
    p.add_argument("--device", help="any torch device; defaults to cuda when available, else cpu")
    data = p.add_argument_group("benchmark files (see docs/evaluation.md)")
    data.add_argument("--instances", help="coco: instances_val2017.json")
    data.add_argument("--captions", help="coco: captions_val2017.json")
    data.add_argument("--image-dir", help="coco: the val2017 folder; refexp: the referred images")
    data.add_argument("--rows", help="layoutsam: LayoutSAM-Eval rows (.parquet, .jsonl, .json or a saved dataset)")
    data.add_argument("--refs", help="refexp: a Ref-L4 or RefCOCO style JSON of referring expressions")
    data.add_argument("--judge", help="layoutsam: the judge VLM's local folder (MiniCPM-V-2.6 by the protocol)")
    data.add_argument("--fid-weights", help="coco, layoutsam: FID Inception weights file; FID is computed with it")
    data.add_argument("--fid-resolution", type=int, default=299, help="side both image sets are resized to for FID")
    data.add_argument("--limit", type=int, help="benchmarks: the first N layouts (or expressions) only")
    data.add_argument("--palette", action="store_true", help="decode with the shapes palette (the tiny checkpoint)")
    p.set_defaults(func=_eval)

    s = sub.add_parser(
        "eval-samples", help="tiny benchmark files in the official formats and a tiny judge, to try eval offline"
    )
    s.add_argument("output_dir")
    s.add_argument("--num-layouts", type=int, default=16)
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty OUTPUT_DIR")
    s.set_defaults(func=_eval_samples)

    t = sub.add_parser("eval-table", help="the paper's table (Markdown) from benchmark runs' folders")
    t.add_argument("runs", nargs="+", help="folders of `eval --benchmark` runs (or their report.json)")
    t.set_defaults(func=_eval_table)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a trained checkpoint as a LoRA adapter or, with --merge, a merged model")
    p.add_argument("--checkpoint", required=True, help="a trainer output directory or one of its checkpoint-N")
    p.add_argument("--output", required=True, help="the export directory")
    p.add_argument("--merge", action="store_true", help="merge the adapter into its base: a plain Janus checkpoint")
    p.add_argument("--base", help="the adapter's base model, instead of the base_model_name_or_path it records")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    p.set_defaults(func=_export)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="images for one layout, and a grid with the layout drawn")
    p.add_argument("--model", required=True, help="Janus checkpoint directory or hub id")
    p.add_argument("--adapter", help="PEFT adapter directory, merged into the model")
    p.add_argument("--layout", help='a layout JSON file: {"caption": ..., "entities": [{"phrase", "box"}, ...]}')
    p.add_argument("--caption", help="the global caption (replaces the layout file's)")
    p.add_argument(
        "--box", action="append", default=[], help='"phrase:x1,y1,x2,y2", normalized to [0, 1]; repeat per object'
    )
    p.add_argument("--out", required=True, help="the grid's path, FILE.png; the images are FILE-0.png, ...")
    p.add_argument("--num", type=int, default=4, help="images to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--guidance-scale",
        type=float,
        help="CFG scale; defaults to the checkpoint's (1 when it trained no CFG branch)",
    )
    p.add_argument("--temperature", type=float, help="0 decodes greedily; defaults to the checkpoint's (else 1)")
    p.add_argument("--palette", action="store_true", help="decode with the shapes palette (the tiny checkpoint)")
    p.add_argument("--batch-size", type=int, default=16, help="images per rollout (changes the sampled images)")
    p.add_argument("--device", help="defaults to cuda when available, else cpu")
    p.set_defaults(func=_generate)


def _add_ground(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ground", help="the model's boxes for phrases (or all objects) in an image, as JSON")
    p.add_argument("--model", required=True, help="Janus checkpoint directory or hub id")
    p.add_argument("--adapter", help="PEFT adapter directory, merged into the model")
    p.add_argument("--image", required=True, help="the image file")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--phrases", help='what to locate, in order: "red square; blue circle"')
    query.add_argument("--detect", action="store_true", help="detect all objects instead")
    p.add_argument("--draw", help="also write the image with the boxes drawn to this .png")
    p.add_argument("--palette", action="store_true", help="encode with the shapes palette (the tiny checkpoint)")
    p.add_argument("--device", help="defaults to cuda when available, else cpu")
    p.set_defaults(func=_ground)


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="stage curves (loss, reward, cycle mIoU) of several runs on one PNG")
    p.add_argument("--runs", nargs="+", required=True, help="run folders (trainer output_dir or checkpoint-N)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echogen-rl", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its line")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_init_tiny(sub)
    _add_demo(sub)
    _add_dry_run(sub)
    _add_study(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_ground(sub)
    _add_plot(sub)
    return parser


def _configure_logging() -> None:
    """Shows the package's progress messages (its loggers' INFO and up) on the terminal as plain lines, unless the
    program running this (a test harness, a notebook) configured logging itself. Other libraries' loggers stay at
    WARNING, as Python shows them when nothing is configured."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("echogen_rl").setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:  # CheckpointError and bad input among them
        if args.debug:
            raise
        print(f"echogen-rl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
