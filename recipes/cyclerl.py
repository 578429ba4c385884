"""Stage 3, CycleRL: GRPO on generated images, rewarded by how well the model grounds its own image.

    accelerate launch recipes/cyclerl.py --config recipes/configs/cyclerl/shapes_tiny.yaml

The stage's `main` lives in the package ([`echogen_rl.scripts.cyclerl`]); this file is its entry point for
`accelerate launch`. Any field can be overridden on the command line, e.g. `--max_steps 50`.
"""

from echogen_rl.scripts.cyclerl import main, make_parser

if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
