"""Reward functions for CycleRL, with TRL's signature `f(prompts, completions, **kwargs) -> list[float | None]`."""
