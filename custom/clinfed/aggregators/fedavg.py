"""Weighted FedAvg on FLARE's ModelAggregator interface (accept_model / aggregate_model)."""

from __future__ import annotations

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator


def weighted_site_metrics(site_metrics: dict[str, dict]) -> dict | None:
    """Sites' metrics of the model they received, averaged weighted by their validation size."""
    totals: dict[str, list[float]] = {}
    for metrics in site_metrics.values():
        n = float(metrics.get("n_val") or 0)
        for key in ("dice", "auc"):
            if metrics.get(key) is not None and n > 0:
                totals.setdefault(key, [0.0, 0.0])
                totals[key][0] += metrics[key] * n
                totals[key][1] += n
    return {key: s / n for key, (s, n) in totals.items()} or None


class WeightedFedAvg(ModelAggregator):
    """Average of the sites' updates weighted by their ``n_samples``.

    Sums as it goes (one running sum, not one copy per site). Reported metrics (those the
    sites measured on the model they received) are averaged weighted by validation size, and
    each site's own figures are kept in ``meta["site_metrics"]``.
    """

    def __init__(self):
        super().__init__()
        self.reset_stats()

    def reset_stats(self):
        self._sum: dict[str, np.ndarray] = {}
        self._weight = 0.0
        self._params_type = None
        self._site_metrics: dict[str, dict] = {}
        self._site_samples: dict[str, float] = {}
        self._site_seconds: dict[str, dict] = {}

    def accept_model(self, model: FLModel):
        site = (model.meta or {}).get(FLMetaKey.SITE_NAME, "?")
        if site in self._site_samples:
            self.warning(f"second update from {site} in one round ignored")
            return
        weight = float((model.meta or {}).get("n_samples", 0))
        if weight <= 0:
            self.warning(f"update from {site} has no positive n_samples; ignored")
            return
        if self._params_type is None:
            self._params_type = model.params_type
        elif model.params_type != self._params_type:
            self.warning(f"update from {site} is {model.params_type}, others {self._params_type}; ignored")
            return
        for name, value in model.params.items():
            weighted = np.asarray(value, dtype=np.float64) * weight
            self._sum[name] = self._sum[name] + weighted if name in self._sum else weighted
        self._weight += weight
        self._site_samples[site] = weight
        meta = model.meta or {}
        self._site_seconds[site] = {k: meta[k] for k in ("train_seconds", "validate_seconds") if k in meta}
        if model.metrics:
            self._site_metrics[site] = dict(model.metrics)

    def aggregate_model(self) -> FLModel:
        if not self._weight:
            raise RuntimeError("no valid update was received this round")
        params = {name: (total / self._weight).astype(np.float32) for name, total in self._sum.items()}
        result = FLModel(params_type=self._params_type or ParamsType.DIFF, params=params,
                         metrics=weighted_site_metrics(self._site_metrics),
                         meta={"site_metrics": self._site_metrics, "site_samples": self._site_samples,
                               "site_seconds": self._site_seconds,
                               "aggregation": "weighted_fedavg"})
        self.reset_stats()
        return result
