"""Per-round wall time of our FedAvg job split into local work vs coordination, against FLARE's
own floor for the same model: FLARE's FedAvgRecipe with a no-op Client API training script,
run in the same SimEnv on the same machine in the same run.

Prints one JSON object. Not a test: it takes a few minutes.

    .venv/bin/python benchmarks/round_overhead.py [--rounds 4] [--sites 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

NOOP_CLIENT = """
import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

flare.init()
while flare.is_running():
    model = flare.receive()
    # Same payload size as a real update: the received weights, sent back unchanged.
    flare.send(FLModel(params=model.params, params_type=ParamsType.FULL, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
"""


def floor_round_seconds(work: Path, sites: int, rounds: int) -> list[float]:
    """FLARE's FedAvg with no training: per-round times from the server log timestamps."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe.sim_env import SimEnv

    from clinfed.models.fusion_seg import FusionSegNet

    script = work / "noop_client.py"
    script.write_text(NOOP_CLIENT)
    recipe = FedAvgRecipe(name="flare_floor", model=FusionSegNet(), min_clients=sites, num_rounds=rounds,
                          train_script=str(script))
    env = SimEnv(clients=[f"site-{i + 1}" for i in range(sites)], num_threads=sites,
                 workspace_root=str(work / "floor_ws"))
    recipe.execute(env).get_result()
    log = next((work / "floor_ws").rglob("server/simulate_job/log.txt"), None) or next(
        (work / "floor_ws").rglob("server/log.txt"))
    return _round_times_from_log(log.read_text())


def _round_times_from_log(text: str) -> list[float]:
    """Seconds between consecutive 'Round N started.' lines and from the last one to the end.
    FLARE prints these in a banner under a timestamped line: each takes the last timestamp seen."""
    import datetime as dt

    stamps = []
    end = when = None
    for line in text.splitlines():
        try:
            when = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            pass
        if when is None:
            continue
        if "started." in line and "Round " in line:
            stamps.append(when)
        elif "Finished FedAvg." in line:
            end = when
    if end is not None:
        stamps.append(end)
    return [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]


def ours(work: Path, sites: int, rounds: int) -> list[dict]:
    from clinfed.data.synth import synthesise
    from clinfed.experiment import DemoConfig, run_federated
    from clinfed.widgets.round_log import ROUND_LOG_FILE

    config = DemoConfig(sites=sites, patients=12, shape=(32, 32, 16), rounds=rounds, local_epochs=1)
    synthesise(work / "data", sites, config.patients, config.shape, config.seed)
    run_dir = run_federated(work / "data", work / "ours_ws", config)
    return [json.loads(line) for line in (run_dir / ROUND_LOG_FILE).read_text().splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        floor = floor_round_seconds(work, args.sites, args.rounds)
        rounds = ours(work, args.sites, args.rounds)
        total = time.perf_counter() - started

    # Round 0 includes start-up work on both sides (first model download, cohort loading): skip it.
    steady = rounds[1:] or rounds
    local = [max(s.get("train_seconds", 0) + s.get("validate_seconds", 0) for s in r["site_seconds"].values())
             for r in steady]
    coordination = [r["seconds"] - work_s for r, work_s in zip(steady, local)]
    floor_steady = floor[1:] or floor
    result = {
        "sites": args.sites,
        "rounds": args.rounds,
        "ours_round_seconds": statistics.median(r["seconds"] for r in steady),
        "ours_local_work_seconds": statistics.median(local),
        "ours_coordination_seconds": statistics.median(coordination),
        "flare_noop_round_seconds": statistics.median(floor_steady),
        "coordination_over_floor": statistics.median(coordination) / statistics.median(floor_steady),
        "target_coordination_over_floor": 1.1,
        "benchmark_seconds": total,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
