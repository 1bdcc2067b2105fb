"""Federated vs centralised Dice on the default demo data, with the smallest site's local-only
Dice, measured in one run. Target: federated >= 0.97 x central (NVFlare BraTS18 anchor: 1.00 x).

Prints one JSON object. Not a test: it runs the full default demo (about 10 minutes on 2 cores).

    .venv/bin/python benchmarks/quality.py [--out DIR] [--rounds N] [--privacy dp+mask]

With ``--privacy`` the federated arm is the private job (the baselines stay non-private), so
its Dice against the plain run's tells what privacy costs in quality.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from clinfed.demo import DemoConfig, run_demo
from clinfed.privacy import PRIVACY_MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--rounds", type=int, help="override the default number of rounds")
    parser.add_argument("--privacy", choices=PRIVACY_MODES, default="none", help="federated arm's privacy")
    args = parser.parse_args()
    config = replace(DemoConfig(), privacy=args.privacy)
    if args.rounds is not None:
        config = replace(config, rounds=args.rounds)

    with tempfile.TemporaryDirectory() as tmp:
        results = run_demo(args.out or Path(tmp), config, log=lambda message: None)

    usable = {site: report["usable"] for site, report in results["ingestion"].items()}
    smallest = min(usable, key=usable.get)
    central, federated = results["central"]["dice"], results["federated"]["dice"]
    print(json.dumps({
        "config": results["config"],
        "central_dice": central,
        "federated_dice": federated,
        "federated_over_central": federated / central if central else None,
        "target_federated_over_central": 0.97,
        "smallest_site": smallest,
        "smallest_site_patients": usable[smallest],
        "smallest_site_local_dice": results["local"][smallest]["dice"],
        "federated_dice_per_round": [r["dice"] for r in results["federated"]["per_round"]],
        "central_auc": results["central"]["auc"],
        "federated_auc": results["federated"]["auc"],
        "privacy": results["privacy"],
        "timings": results["timings"],
    }, indent=2))


if __name__ == "__main__":
    main()
