"""Each stage's `main(script_args, training_args, model_args) -> Trainer`; `recipes/<stage>.py` calls it.

The shipped configs live here (`configs/<stage>/*.yaml`, package data; `recipes/configs` points to them)."""
