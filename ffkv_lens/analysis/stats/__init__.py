"""Per-memory statistics gathered in the trigger search's own corpus pass (dashboards' data).

For every memory: the count of candidate positions, mean and standard deviation of the coefficient,
density above a named threshold, a histogram over per-layer fixed bins, deterministic samples of
examples from activation intervals (quantile groups) and, for gated MLPs, the shares of the four
gate/up sign combinations. Filled inside the search's hooks (no second pass), exact and independent
of the batch size, kept by checkpoints and merged under torchrun; see docs/triggers.md.
"""
