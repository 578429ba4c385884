"""Experiments over the stages: the demo, the seeded study, the CPU dry run, and the job pool they share."""
