"""Privacy building blocks: the site's own policy, budget accounting, sample-level DP-SGD, and
secure aggregation (with update-level DP inside the mask).

FLARE components that use them: ``clinfed.executors.secagg_client`` (site side),
``clinfed.workflows.secagg_fedavg`` (server side), ``clinfed.filters.release_guard`` (a site's
strict scope).
"""

PRIVACY_MODES = ("none", "dp", "mask", "dp+mask")
"""What a job asks of every site: nothing, DP-SGD, secure aggregation, or both (``clinfed.jobs``)."""
