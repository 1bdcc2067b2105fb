"""What federation buys, over seeds: the demo's experiment (:mod:`clinfed.experiment`) scored on
every site's held-out test set, with 95% bootstrap intervals over test patients.

Goals (issue 16): federated Dice >= 0.97 x central with overlapping intervals; federated better
than every local-only model on the union of the test sets, the paired interval excluding 0 for
at least two of three sites; the fused outcome head's AUC above the same head's with the EHR
vector zeroed and with the image embedding zeroed.

Prints one JSON object. Not a test: one full demo experiment per seed (the default size: about
5 minutes each on 2 free cores).

    .venv/bin/python benchmarks/quality.py [--out DIR] [--seeds 0 1 2] [--jobs 3] [--patients N]
        [--test-patients N] [--shape X Y Z] [--rounds N] [--local-epochs E] [--lr LR] [--privacy dp+mask]

With ``--privacy`` the federated arm is the private job (the baselines stay non-private), so
its Dice against the plain run's tells what privacy costs in quality.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from clinfed.experiment import DemoConfig, run_experiment, synthesise_sites
from clinfed.privacy import PRIVACY_MODES

TARGET_FEDERATED_OVER_CENTRAL = 0.97


def _overlap(a: list | None, b: list | None) -> bool | None:
    return None if a is None or b is None else a[0] <= b[1] and b[0] <= a[1]


def one_run(config: DemoConfig, out: Path) -> dict:
    """The demo's experiment on its data (FLARE's logs go to files under ``out``), summarised."""
    out.mkdir(parents=True, exist_ok=True)
    synthesise_sites(out / "data", config)
    results = run_experiment(out / "data", out, config)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return summarise(results, config.seed)


def summarise(results: dict, seed: int) -> dict:
    central, federated = results["central"], results["federated"]
    differences = {site: d["union"] for site, d in results["federated_minus_local"].items()}
    return {
        "seed": seed,
        "test_patients": results["comparison"]["test_patients"],
        "central_dice": central["dice"],
        "federated_dice": federated["dice"],
        "federated_over_central": federated["dice"]["mean"] / central["dice"]["mean"],
        "intervals_overlap": _overlap(federated["dice"]["ci95"], central["dice"]["ci95"]),
        "local_dice": {site: scores["dice"] for site, scores in results["local"].items()},
        "federated_minus_local_union": differences,
        "sites_where_federated_wins": sum(d["ci95"] is not None and d["ci95"][0] > 0 for d in differences.values()),
        "site_arm_dice": {arm: {site: s["dice"]["mean"] for site, s in by_site.items()}
                          for arm, by_site in results["site_arm"]["arms"].items()},
        "outcome_auc": {arm: {key: results[arm][key] for key in ("auc", "auc_ehr_zeroed", "auc_image_zeroed")}
                        for arm in ("central", "federated")},
        "federated_dice_per_round_validation": [r["dice"] for r in federated["per_round"]],
        "privacy": results["privacy"],
        "timings": results["timings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="data and initialisation seeds")
    parser.add_argument("--patients", type=int, help="override the training patients per site")
    parser.add_argument("--shape", type=int, nargs=3, help="override the generated volume size (voxels)")
    parser.add_argument("--test-patients", type=int, help="override the held-out test patients per site")
    parser.add_argument("--rounds", type=int, help="override the default number of rounds")
    parser.add_argument("--local-epochs", type=int, help="override the default local epochs per round")
    parser.add_argument("--lr", type=float, help="override the default learning rate (all arms)")
    parser.add_argument("--privacy", choices=PRIVACY_MODES, default="none", help="federated arm's privacy")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in a process of its own")
    args = parser.parse_args()
    overrides = {"shape": tuple(args.shape) if args.shape else None, "patients": args.patients, "test_patients": args.test_patients, "rounds": args.rounds,
                 "local_epochs": args.local_epochs, "lr": args.lr}
    config = replace(DemoConfig(), privacy=args.privacy, **{k: v for k, v in overrides.items() if v is not None})

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        configs = [replace(config, seed=seed) for seed in args.seeds]
        folders = [root / f"seed-{seed}" for seed in args.seeds]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs = list(pool.map(one_run, configs, folders))
        else:
            runs = [one_run(c, f) for c, f in zip(configs, folders)]

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    sites = list(runs[0]["local_dice"])
    print(json.dumps({
        "config": {k: v for k, v in asdict(config).items() if k != "seed"},
        "seeds": args.seeds,
        "mean_central_dice": mean(r["central_dice"]["mean"] for r in runs),
        "mean_federated_dice": mean(r["federated_dice"]["mean"] for r in runs),
        "mean_federated_over_central": mean(r["federated_over_central"] for r in runs),
        "target_federated_over_central": TARGET_FEDERATED_OVER_CENTRAL,
        "seeds_with_overlapping_intervals": sum(bool(r["intervals_overlap"]) for r in runs),
        "mean_local_dice": {site: mean(r["local_dice"][site]["mean"] for r in runs) for site in sites},
        "mean_federated_minus_local_union": {
            site: mean(r["federated_minus_local_union"][site]["mean"] for r in runs) for site in sites},
        "sites_where_federated_wins_per_seed": [r["sites_where_federated_wins"] for r in runs],
        "mean_outcome_auc": {arm: {key: mean(r["outcome_auc"][arm][key]["mean"] for r in runs)
                                   for key in ("auc", "auc_ehr_zeroed", "auc_image_zeroed")}
                             for arm in ("central", "federated")},
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
