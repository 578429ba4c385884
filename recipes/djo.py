"""Stage 2, DJO: layout -> image -> layout, the loop loss read through Gumbel-Softmax image tokens.

    accelerate launch recipes/djo.py --config recipes/configs/djo/shapes_tiny.yaml

The stage's `main` lives in the package ([`echogen_rl.scripts.djo`]); this file is its entry point for
`accelerate launch`. Any field can be overridden on the command line, e.g. `--max_steps 50`.
"""

from echogen_rl.scripts.djo import main, make_parser

if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
