"""Privacy building blocks: budget accounting, sample-level DP-SGD, pairwise secure masking.

FLARE components that use them live in ``clinfed.filters`` (site side) and
``clinfed.aggregators.masked_sum`` (server side).
"""

PRIVACY_MODES = ("none", "dp", "mask", "dp+mask")
"""What a job asks of every site: nothing, DP-SGD, secure masking, or both (``clinfed.jobs``)."""
