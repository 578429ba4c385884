"""The shapes world's splits, by seed, in one place: which seed draws the layouts each job trains on, chooses its
settings on, or is scored on.

Training draws from small seeds (`dataset_seed`, 0 by default; the study's seed sets from 0 and from 100), and each
training run's own eval split from `dataset_seed + EVAL_SEED_OFFSET`. The seeds below are far from all of those and
from each other, so that no job is scored on layouts it trained on or chose its settings on.
"""

from __future__ import annotations

# Added to the seed of the shapes train split to seed its eval split; far from any small seed a user would pick.
EVAL_SEED_OFFSET = 1_000_003
# `echogen-rl eval`'s held-out layouts (plus the run's `--seed`).
EVAL_HELD_OUT_SEED = 2_000_003
# The demo's held-out layouts.
DEMO_HELD_OUT_SEED = 3_000_017
# Where studies and the validation benchmarks choose settings; no seed set scores it.
VALIDATION_SEED = 4_000_037
# The sample benchmark files (`echogen_rl.eval.benchmarks.samples`): official formats, shapes content.
BENCHMARK_SAMPLES_SEED = 7_000_003
# Replication: each set trains on its own seeds (PMTP on the first) and scores its own held-out layouts. A claim
# stands only when it holds on both.
SEED_SETS = {
    "a": {"first_seed": 0, "held_out_seed": 5_000_011},
    "b": {"first_seed": 100, "held_out_seed": 6_000_023},
}
