"""Stage 1, PMTP: layout-to-image and image-to-layout packed in one sequence with a task-aware mask.

    accelerate launch recipes/pmtp.py --config recipes/configs/pmtp/shapes_tiny.yaml

The stage's `main` lives in the package ([`echogen_rl.scripts.pmtp`]); this file is its entry point for
`accelerate launch`. Any field can be overridden on the command line, e.g. `--max_steps 50`.
"""

from echogen_rl.scripts.pmtp import main, make_parser

if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
