"""Server-side aggregators (FLARE ModelAggregator), one class per algorithm."""
