"""Membership inference against the federated model, with and without DP-SGD, on the same data
at two cohort sizes: loss-threshold and LiRA attacks (``clinfed.evaluation.membership``), each
reporting AUC, advantage (max TPR - FPR), its chance level and TPR at 1% FPR with 95% intervals.

Prints one JSON object. The same audit as ``clinfed eval privacy``; here the sites are generated.

    .venv/bin/python benchmarks/mia.py --out mia_out [--sizes 16 40] [--models 16] [--epsilon 8]

Every patient of every site is judged by every model (Carlini's protocol: each model the target,
the others its shadows); the DP and non-DP arms use the same cohorts, the same random halves and
the same seeds. Settings that make a model remember (few patients, many epochs, a high learning
rate) are deliberate: they are the product's own training code, and an audit must find leakage
where there is some, or its "no leakage" under DP means nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clinfed.evaluation.cohorts import synthetic_sites
from clinfed.evaluation.federation import Recipe
from clinfed.evaluation.membership import audit_pool, train_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="generated sites go here (reused)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 40], help="generated patients per site")
    parser.add_argument("--models", type=int, default=16, help="federations per arm (targets and shadows)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD epsilon of the private arm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--roi", type=int, nargs=3, default=[16, 16, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    runs = []
    for size in args.sizes:
        pools = synthetic_sites(args.out / f"sites-{size}", n_sites=3, n_patients=size,
                                shape=tuple(args.roi), seed=args.seed)
        for epsilon in (None, args.epsilon):
            recipe = Recipe(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
                            lr=args.lr, roi=tuple(args.roi), dp_epsilon=epsilon)
            started = time.perf_counter()
            pool = train_pool(pools, recipe, sites=sorted(pools), n_models=args.models, seed=args.seed)
            runs.append({"generated_per_site": size, "usable_per_site": {s: len(c) for s, c in pools.items()},
                         "dp_epsilon": epsilon, "epsilon_spent": pool.epsilon[0],
                         "attacks_all_sites": audit_pool(pool, seed=args.seed),
                         "attacks_site_1": audit_pool(pool, site="site-1", seed=args.seed),
                         "seconds": time.perf_counter() - started})
    print(json.dumps({"config": {**vars(args), "out": str(args.out)}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
