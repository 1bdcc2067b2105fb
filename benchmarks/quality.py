"""Federated vs centralised Dice on the default demo data, with the smallest site's local-only
Dice, measured in one run. Target: federated >= 0.97 x central (NVFlare BraTS18 anchor: 1.00 x).

Prints one JSON object. Not a test: it runs the full default demo once per seed (about 4
minutes each on 2 cores).

    .venv/bin/python benchmarks/quality.py [--out DIR] [--seeds 0 1 2] [--rounds N] [--local-epochs E]
        [--lr LR] [--privacy dp+mask]

With ``--privacy`` the federated arm is the private job (the baselines stay non-private), so
its Dice against the plain run's tells what privacy costs in quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from clinfed.experiment import DemoConfig, run_experiment, synthesise_sites
from clinfed.privacy import PRIVACY_MODES


def one_run(config: DemoConfig, out: Path) -> dict:
    """The demo's experiment on its data (FLARE's logs go to files under ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    synthesise_sites(out / "data", config)
    results = run_experiment(out / "data", out, config)
    usable = {site: report["usable"] for site, report in results["ingestion"].items()}
    smallest = min(usable, key=usable.get)
    central, federated = results["central"]["dice"], results["federated"]["dice"]
    return {
        "seed": config.seed,
        "central_dice": central,
        "federated_dice": federated,
        "federated_over_central": federated / central if central else None,
        "smallest_site": smallest,
        "smallest_site_patients": usable[smallest],
        "smallest_site_local_dice": results["local"][smallest]["dice"],
        "federated_dice_per_round": [r["dice"] for r in results["federated"]["per_round"]],
        "central_auc": results["central"]["auc"],
        "federated_auc": results["federated"]["auc"],
        "privacy": results["privacy"],
        "timings": results["timings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, help="override the default number of rounds")
    parser.add_argument("--local-epochs", type=int, help="override the default local epochs per round")
    parser.add_argument("--lr", type=float, help="override the default learning rate (all arms)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="data and initialisation seeds; one run each (Dice on ~15 cases is noisy)")
    parser.add_argument("--privacy", choices=PRIVACY_MODES, default="none", help="federated arm's privacy")
    args = parser.parse_args()
    overrides = {"rounds": args.rounds, "local_epochs": args.local_epochs, "lr": args.lr}
    config = replace(DemoConfig(), privacy=args.privacy, **{k: v for k, v in overrides.items() if v is not None})

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        runs = [one_run(replace(config, seed=seed), root / f"seed-{seed}") for seed in args.seeds]

    ratios = [r["federated_over_central"] for r in runs if r["federated_over_central"] is not None]
    print(json.dumps({
        "config": {k: v for k, v in asdict(config).items() if k != "seed"},
        "seeds": args.seeds,
        "mean_central_dice": statistics.mean(r["central_dice"] for r in runs),
        "mean_federated_dice": statistics.mean(r["federated_dice"] for r in runs),
        "mean_federated_over_central": statistics.mean(ratios) if ratios else None,
        "target_federated_over_central": 0.97,
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
