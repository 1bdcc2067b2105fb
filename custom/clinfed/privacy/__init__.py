"""Privacy building blocks: budget accounting, sample-level DP-SGD, pairwise secure masking.

FLARE components that use them live in ``clinfed.filters`` (site side) and
``clinfed.aggregators.masked_sum`` (server side).
"""
