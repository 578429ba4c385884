"""The three stages: PMTP, DJO and CycleRL, each a TRL config and trainer, and their callbacks."""
