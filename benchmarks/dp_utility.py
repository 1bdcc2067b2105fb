"""What DP-SGD leaves of the federated model: Dice at epsilon in {1, 3, 8, inf} (delta 1e-5) and
{24, 100, 300} patients per site (3 sites), against the non-private federated and centralised
models on one held-out test set, plus the effect of each lever of ``SiteDPSGD`` at the largest
cohort and epsilon 8. Goal: DP Dice >= 0.90 x non-private federated Dice at 300 patients/site, eps 8.

Prints one JSON object and writes ``dp_utility.png`` (Dice vs epsilon per cohort size; the lever
table as bars) beside the data in ``--out``.

    # the full grid (a GPU or a big machine; hours on 2 CPU cores):
    .venv/bin/python benchmarks/dp_utility.py --out dp_utility_out
    # what was run on the 2-core machine (README, "Measured privacy"): one process per seed and
    # one per lever seed, sharing the data and the public-set model (symlinked), then merged:
    S="--roi 16,16,16 --shape 32,32,16 --epochs 2 --nonprivate-batch 8 --dp-lr 1e-2 --pretrain-epochs 4 \\
       --test-per-site 20 --generated-per-site 375"
    .venv/bin/python benchmarks/dp_utility.py --out run-s0 --sizes 300 --seeds 0 --epsilons 8 3 1 inf --no-levers $S
    .venv/bin/python benchmarks/dp_utility.py --out run-small --sizes 24 100 --seeds 0 1 --no-levers $S
    .venv/bin/python benchmarks/dp_utility.py --out run-levers-s0 --no-grid --sizes 300 --lever-seeds 0 $S
    .venv/bin/python benchmarks/dp_utility.py --out merged --merge run-*/dp_utility.json

Arms (every federated arm is :func:`clinfed.evaluation.federation.train_federated`: the product's
training code and ``SiteDPSGD``, FedAvg in-process; the same ``--epochs`` per site for every arm):

- ``central``: one model on the pooled training patients, non-private;
- ``federated``: the product's recipe (4 rounds, Adam; batch ``--nonprivate-batch``), non-private, from scratch;
- ``federated_pretrained``: the same from the public-set model (the stronger non-private baseline);
- ``public_only``: the public-set model with no site data (what DP training must improve on; one
  pretraining, ``--pretrain-seed``, cached in ``--out``, shared by every seed of every arm);
- ``dp``: the winning DP recipe at each epsilon;
- ``levers``: at ``--lever-size`` patients per site and epsilon 8, the product's DP recipe with one
  lever added at a time, in the order listed, each row keeping the previous ones (a cumulative
  ablation: a lever's effect is measured given the ones above it).

The public set is generated from its own scanner profile (``clinfed.evaluation.cohorts``) and
stands in for a public collection such as the Medical Segmentation Decathlon.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from clinfed.evaluation.cohorts import public_anatomy_set, synthetic_sites
from clinfed.evaluation.federation import Recipe, train_central, train_federated
from clinfed.training import evaluate, make_loader, state_to_numpy

GOAL_RATIO = 0.90
# Share of generated patients that ingestion keeps (the generator leaves about 15% without an
# active consent); sites are generated with enough patients for the largest size.
USABLE_SHARE = 0.80


def _shape(text: str) -> tuple[int, int, int]:
    x, y, z = (int(v) for v in text.split(","))
    return x, y, z


def _epsilon(text: str) -> float:
    return math.inf if text == "inf" else float(text)


def mean_ci(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (no interval from one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values), "values": values}
    half = student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values), "values": values}


def product_recipe(args, batch_size: int = 2) -> Recipe:
    """The executor's defaults (batch 2, up to 4 rounds, Adam 2e-3), with this run's epoch budget and ROI."""
    rounds = min(4, args.epochs)
    return Recipe(rounds=rounds, local_epochs=max(1, args.epochs // rounds), batch_size=batch_size, roi=args.roi)


def lever_steps(args, n: int) -> list[tuple[str, dict]]:
    """The cumulative ablation: each lever as the fields it changes in the recipe."""
    big_batch = min(64, n)
    product = product_recipe(args)
    return [
        (f"product DP recipe (batch 2, {product.rounds} rounds x {product.local_epochs} epochs, all parameters, "
         "DP-Adam)", {}),
        (f"larger expected Poisson batch ({big_batch})", {"batch_size": big_batch}),
        ("fewer, longer rounds (1 round)", {"rounds": 1, "local_epochs": args.epochs}),
        ("pretrained on the public set", {"pretrained": True}),
        ("train fewer parameters (decoder + norms)", {"dp_trainable": "decoder"}),
        ("train fewer parameters (norms + head)", {"dp_trainable": "norm+head"}),
        (f"DP-Adam lr {args.dp_lr:g} (few parameters take larger steps)", {"lr": args.dp_lr}),
        ("augmentation multiplicity 2", {"dp_augmentation_multiplicity": 2}),
        ("per-layer clipping", {"dp_clipping": "per_layer"}),
        ("DP-SGD (momentum 0.9, lr 0.05) instead of DP-Adam", {"optimizer": "sgd", "lr": 0.05}),
    ]


class Bench:
    def __init__(self, args):
        self.args = args
        data = args.out / "data"
        n_generate = args.generated_per_site or math.ceil(max(args.sizes) / USABLE_SHARE)
        self.sites = synthetic_sites(data / "sites", n_sites=3, n_patients=n_generate, shape=args.shape, seed=0)
        short = {s: len(c) for s, c in self.sites.items() if len(c) < max(args.sizes)}
        if short:
            raise SystemExit(f"too few usable patients for {max(args.sizes)} per site: {short}")
        test_sites = synthetic_sites(data / "test", n_sites=3, n_patients=args.test_patients, shape=args.shape,
                                     seed=1)
        self.test = [c for cases in test_sites.values() for c in cases[:args.test_per_site]]
        self.public = public_anatomy_set(data / "public", n_patients=args.public_patients, shape=args.shape, seed=2)
        self.eval_config = Recipe(roi=args.roi).train_config()  # the demo study's spacing and normalisation
        self.test_loader = make_loader(self.test, self.eval_config, train=False)
        self._pretrained: dict | None = None
        self.seconds: dict[str, float] = {}

    def cohort(self, n: int) -> dict:
        return {site: cases[:n] for site, cases in self.sites.items()}

    def dice(self, model) -> float:
        return evaluate(model, self.test_loader, self.eval_config)["dice"]

    def _timed(self, key: str, fn):
        started = time.perf_counter()
        result = fn()
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
        return result

    def pretrained(self) -> dict:
        """The public-set model (trained once per ``--out``, ROI and epochs, then read back)."""
        if self._pretrained is None:
            a = self.args
            cache = a.out / f"public_model_{'x'.join(map(str, a.roi))}_e{a.pretrain_epochs}_s{a.pretrain_seed}.npz"
            if not cache.exists():
                recipe = Recipe(batch_size=8, roi=a.roi)
                model = self._timed("pretraining", lambda: train_central(
                    self.public, recipe, epochs=a.pretrain_epochs, seed=a.pretrain_seed))
                np.savez(cache, **state_to_numpy(model))
            self._pretrained = dict(np.load(cache))
        return self._pretrained

    def federated(self, n: int, recipe: Recipe, seed: int, *, pretrained: bool, key: str) -> dict:
        initial = self.pretrained() if pretrained else None
        trained = self._timed(key, lambda: train_federated(self.cohort(n), recipe, seed=seed, initial=initial))
        return {"dice": self.dice(trained.model), "epsilon": max(trained.epsilon.values(), default=None)}

    def central(self, n: int, seed: int) -> float:
        cases = [c for cases in self.cohort(n).values() for c in cases]
        recipe = Recipe(batch_size=8, roi=self.args.roi)
        model = self._timed("central", lambda: train_central(cases, recipe, epochs=self.args.epochs, seed=seed))
        return self.dice(model)


def winning_recipe(args, n: int, epsilon: float) -> tuple[Recipe, bool]:
    """The DP recipe the lever table chose (and whether it starts from the public-set model)."""
    recipe = Recipe(rounds=1, local_epochs=args.epochs, batch_size=min(64, n), lr=args.dp_lr, roi=args.roi,
                    dp_epsilon=epsilon, dp_trainable="norm+head")
    return recipe, True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="data and the PNG go here (data are reused)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 100, 300], help="patients per site")
    parser.add_argument("--epsilons", type=_epsilon, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every arm")
    parser.add_argument("--curve-seeds", type=int, nargs="+", help="seeds of the epsilons other than 8 "
                        "(default: --seeds)")
    parser.add_argument("--lever-size", type=int, help="patients per site of the lever table (default: the largest)")
    parser.add_argument("--lever-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the lever table")
    parser.add_argument("--no-levers", action="store_true", help="skip the lever table")
    parser.add_argument("--roi", type=_shape, default=(32, 32, 16), help="model input size (the demo's)")
    parser.add_argument("--shape", type=_shape, default=(48, 48, 24), help="generated volume size (the demo's)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs per site, every arm")
    parser.add_argument("--pretrain-epochs", type=int, default=8, help="epochs on the public set")
    parser.add_argument("--pretrain-seed", type=int, default=0)
    parser.add_argument("--nonprivate-batch", type=int, default=2,
                        help="batch size of the non-private federated arms (the executor's default: 2)")
    parser.add_argument("--dp-lr", type=float, default=2e-3, help="DP-Adam learning rate of the winning recipe")
    parser.add_argument("--generated-per-site", type=int, help="patients generated per site (default: enough for "
                        "the largest size); the first --sizes usable ones train")
    parser.add_argument("--test-patients", type=int, default=40, help="generated test patients per site")
    parser.add_argument("--test-per-site", type=int, help="usable test patients per site evaluated (default: all)")
    parser.add_argument("--no-grid", action="store_true", help="only the lever table (run it beside a grid run)")
    parser.add_argument("--public-patients", type=int, default=300, help="generated public-set patients")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="instead of running: pool the seeds of these dp_utility.json files (runs of the same "
                             "settings split over processes) into --out's dp_utility.json and PNG")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merged = merge_runs([json.loads(path.read_text()) for path in args.merge], [str(p) for p in args.merge])
        (args.out / "dp_utility.json").write_text(json.dumps(merged, indent=2))
        _plot(merged, args.out / "dp_utility.png")
        print(json.dumps(merged, indent=2))
        return
    started = time.perf_counter()
    bench = Bench(args)

    results: dict = {"sizes": {}, "levers": None}
    for n in [] if args.no_grid else args.sizes:
        row: dict = {}
        results["sizes"][str(n)] = row
        row["central"] = mean_ci([bench.central(n, s) for s in args.seeds])
        plain = product_recipe(args, batch_size=args.nonprivate_batch)
        row["federated"] = mean_ci([bench.federated(n, plain, s, pretrained=False, key="federated")["dice"]
                                    for s in args.seeds])
        row["federated_pretrained"] = mean_ci([bench.federated(n, plain, s, pretrained=True, key="federated")["dice"]
                                               for s in args.seeds])
        row["public_only"] = mean_ci([bench.dice(_model_from(bench.pretrained()))])
        plain_dice = dict(zip(args.seeds, row["federated"]["values"]))
        baseline = {s: max(f, p) for s, f, p in zip(args.seeds, row["federated"]["values"],
                                                    row["federated_pretrained"]["values"])}
        row["dp"] = {}
        for epsilon in args.epsilons:
            if math.isinf(epsilon):
                continue
            recipe, pretrained = winning_recipe(args, n, epsilon)
            seeds = args.seeds if epsilon == 8.0 else (args.curve_seeds or args.seeds)
            runs = [bench.federated(n, recipe, s, pretrained=pretrained, key="dp") for s in seeds]
            dice = [r["dice"] for r in runs]
            row["dp"][str(epsilon)] = {
                "dice": mean_ci(dice),
                "ratio_to_best_nonprivate_federated": mean_ci([d / baseline[s] for s, d in zip(seeds, dice)]),
                "ratio_to_federated": mean_ci([d / plain_dice[s] for s, d in zip(seeds, dice)]),
                "seeds": seeds,
                "epsilon_spent_max": max(r["epsilon"] for r in runs), "recipe": recipe.describe(),
                "pretrained": pretrained}
            _save(results, args, bench, started, complete=False)

    if not args.no_levers:
        n = args.lever_size or max(args.sizes)
        recipe, pretrained = replace(product_recipe(args), dp_epsilon=8.0), False
        table, previous = [], None
        for name, change in lever_steps(args, n):
            change = dict(change)
            pretrained = change.pop("pretrained", pretrained)
            recipe = replace(recipe, **change)
            dice = mean_ci([bench.federated(n, recipe, s, pretrained=pretrained, key="levers")["dice"]
                            for s in args.lever_seeds])
            table.append({"lever": name, "dice": dice, "change_from_previous":
                          None if previous is None else dice["mean"] - previous, "recipe": recipe.describe(),
                          "pretrained": pretrained})
            previous = dice["mean"]
            results["levers"] = {"size": n, "epsilon": 8.0, "rows": table}
            _save(results, args, bench, started, complete=False)

    _save(results, args, bench, started, complete=True)
    _plot(results, args.out / "dp_utility.png")
    print((args.out / "dp_utility.json").read_text())


def _save(results: dict, args, bench: Bench, started: float, *, complete: bool) -> None:
    """Write ``dp_utility.json`` (after each cohort and lever row too: a long run stopped early keeps
    what it measured, marked ``complete: false``)."""
    largest = results["sizes"].get(str(max(args.sizes)), {"dp": {}})
    at_eight = largest["dp"].get("8.0")
    results["goal"] = {"size": max(args.sizes), "epsilon": 8.0, "target_ratio": GOAL_RATIO,
                       "ratio": at_eight and at_eight["ratio_to_best_nonprivate_federated"]["mean"],
                       "met": bool(at_eight and at_eight["ratio_to_best_nonprivate_federated"]["mean"] >= GOAL_RATIO)}
    results["config"] = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items()}
    results["data"] = {"usable_per_site": {s: len(c) for s, c in bench.sites.items()}, "test_patients": len(bench.test),
                       "public_patients": len(bench.public)}
    results["seconds"] = {**bench.seconds, "total": time.perf_counter() - started}
    results["png"] = str(args.out / "dp_utility.png")
    results["complete"] = complete
    (args.out / "dp_utility.json").write_text(json.dumps(results, indent=2))


def merge_runs(runs: list[dict], names: list[str]) -> dict:
    """One result from runs that differ only in their seeds: every arm's per-seed values pooled
    (means and intervals recomputed), the lever rows matched by name, the seconds summed."""
    settings = [{k: v for k, v in run["config"].items() if k not in _PER_RUN} for run in runs]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"--merge: the runs differ in more than {', '.join(_PER_RUN)}")

    def pooled(items: list[dict]) -> dict:
        return mean_ci([v for item in items for v in item["values"]])

    sizes: dict = {}
    for run in runs:
        for size, row in run["sizes"].items():
            sizes.setdefault(size, []).append(row)
    merged_sizes = {}
    for size, rows in sorted(sizes.items(), key=lambda item: int(item[0])):
        merged = {arm: pooled([r[arm] for r in rows]) for arm in ("central", "federated", "federated_pretrained")}
        merged["public_only"] = rows[0]["public_only"]  # one pretraining, shared by every run
        merged["dp"] = {}
        for epsilon in sorted({e for r in rows for e in r["dp"]}, key=float):
            parts = [r["dp"][epsilon] for r in rows if epsilon in r["dp"]]
            merged["dp"][epsilon] = {**parts[0], "seeds": [s for part in parts for s in part["seeds"]],
                                     "epsilon_spent_max": max(part["epsilon_spent_max"] for part in parts),
                                     **{k: pooled([part[k] for part in parts]) for k in (
                                         "dice", "ratio_to_best_nonprivate_federated", "ratio_to_federated")}}
        merged_sizes[size] = merged
    levers = None
    lever_runs = [run["levers"] for run in runs if run["levers"]]
    if lever_runs:
        rows, previous = [], None
        for row in lever_runs[0]["rows"]:
            parts = [r for run in lever_runs for r in run["rows"] if r["lever"] == row["lever"]]
            dice = pooled([part["dice"] for part in parts])
            rows.append({**row, "dice": dice,
                         "change_from_previous": None if previous is None else dice["mean"] - previous})
            previous = dice["mean"]
        levers = {**lever_runs[0], "rows": rows}
    largest = merged_sizes.get(str(max(int(s) for s in merged_sizes)), {"dp": {}}) if merged_sizes else {"dp": {}}
    at_eight = largest["dp"].get("8.0")
    ratio = at_eight and at_eight["ratio_to_best_nonprivate_federated"]["mean"]
    seconds: dict = {}
    for run in runs:
        for key, value in run["seconds"].items():
            seconds[key] = seconds.get(key, 0.0) + value
    return {"sizes": merged_sizes, "levers": levers,
            "goal": {"size": max((int(s) for s in merged_sizes), default=None), "epsilon": 8.0,
                     "target_ratio": GOAL_RATIO, "ratio": ratio, "met": bool(ratio and ratio >= GOAL_RATIO)},
            "merged_from": names, "configs": [run["config"] for run in runs], "data": runs[0]["data"],
            "seconds_summed_over_runs": seconds, "complete": all(run["complete"] for run in runs)}


# Settings in which runs to be merged may differ.
_PER_RUN = ("out", "epsilons", "seeds", "curve_seeds", "lever_seeds", "sizes", "no_grid", "no_levers", "lever_size", "merge")


def _model_from(state: dict):
    from clinfed.training import load_numpy_state, new_model

    model = new_model()
    load_numpy_state(model, state)
    return model


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for size, row in results["sizes"].items():
        epsilons = sorted(float(e) for e in row["dp"])
        points = [row["dp"][str(e)]["dice"]["mean"] for e in epsilons]
        line = curve.plot(epsilons, points, marker="o", label=f"DP, {size}/site")[0]
        curve.axhline(max(row["federated"]["mean"], row["federated_pretrained"]["mean"]), color=line.get_color(),
                      linestyle="--", label=f"non-private federated, {size}/site")
        curve.axhline(row["central"]["mean"], color=line.get_color(), linestyle=":", label=f"central, {size}/site")
    if results["sizes"]:
        public = next(iter(results["sizes"].values()))["public_only"]["mean"]
        curve.axhline(public, color="grey", linestyle="-.", label="public-set model alone (no site data)")
    curve.set_xscale("log")
    curve.set_xlabel("epsilon per site (delta 1e-5)")
    curve.set_ylabel("test Dice (mean over seeds)")
    curve.set_ylim(0, 1)
    curve.legend(fontsize=7)
    if results["levers"]:
        rows = results["levers"]["rows"]
        bars.barh(range(len(rows)), [r["dice"]["mean"] for r in rows], color="tab:blue")
        bars.set_yticks(range(len(rows)), [r["lever"] for r in rows], fontsize=7)
        bars.invert_yaxis()
        bars.set_xlim(0, 1)
        bars.set_xlabel(f"test Dice at epsilon 8, {results['levers']['size']}/site (cumulative levers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
