"""What secure aggregation costs, side by side in one run: prints one JSON object.

For each site count (default 3 and 10), FLARE's simulator runs the same 4.7M-parameter model
(MONAI SegResNet, init_filters=16) for ``--rounds`` rounds under four configurations:

- ``plain``: FLARE's FedAvg with clinfed's weighted aggregator;
- ``secagg``: ``SecAggFedAvg`` + ``SecAggClient`` (three tasks a round, exact encoding);
- ``secagg_dp``: the same with update-level DP inside the mask (Skellam noise, sigma 1);
- ``secagg_dropout``: ``secagg`` with one site dropping after setup in every round (at 3 sites the
  sites' policy then accepts rounds of 2, below the default minimum of 3).

Sites do not train (each returns a random update of the model's size), so the difference is the
protocol. ``--consortium N ...`` repeats ``plain`` and ``secagg`` in a provisioned trial consortium
of N sites (server and sites as separate FLARE processes from their startup kits, jobs submitted
through the FLARE API, each site's key registered by the site); the benchmark's no-training site
is custom code, so that trial allows BYOC to its lead, which a real consortium never does. Reported per configuration: seconds per round (median over the rounds after the first)
and its ratio to ``plain``, and bytes each site uploads per round (FOBS-serialised results of all
its tasks, measured by a result filter at the site) and the ratio to ``plain``. Every
configuration uses the same task polling (``TASK_CHECK_PERIOD``, ``TASK_REQUEST_INTERVAL``).

``--utility`` measures what secure aggregation costs a real job and what update-level DP inside the
mask leaves of the model: the demo's job (FusionSegNet, real training on synthetic sites) at 3 and
10 sites, plain FedAvg, with secure aggregation, and with it at each ``--noise`` multiplier:
federated Dice on the sites' validation patients, seconds per round, and the site-level epsilon
each site spent.

Usage: python benchmarks/secagg.py [--sites 3 10] [--rounds 5] [--consortium 3 10]
       [--utility [--noise 0.5 1.0] [--clip 1.0] [--skip-timing]]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.shareable import make_reply
from nvflare.app_common.app_constant import AppConstants

CONFIGS = ("plain", "secagg", "secagg_dp", "secagg_dropout")
SAMPLES = 30


class RandomUpdate(Executor):
    """A site that does not train: a random weight difference of the received model's shape.
    ``fail_every_round``: the site drops after setup in every round (no masked input)."""

    def __init__(self, fail_every_round: bool = False):
        super().__init__()
        self.fail_every_round = fail_every_round

    def execute(self, task_name, shareable, fl_ctx, abort_signal):
        if task_name != AppConstants.TASK_TRAIN:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        if self.fail_every_round:
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        round_ = int(shareable.get_header(AppConstants.CURRENT_ROUND))
        rng = np.random.default_rng(zlib.crc32(f"{fl_ctx.get_identity_name()}/{round_}".encode()))
        update = {k: rng.normal(0, 1e-3, np.shape(v)).astype(np.float32) for k, v in from_shareable(shareable).data.items()}
        result = DXO(DataKind.WEIGHT_DIFF, data=update, meta={"n_samples": SAMPLES}).to_shareable()
        result.set_header(AppConstants.CURRENT_ROUND, round_)
        return result


class UploadMeter(Filter):
    """Last result filter at a site: appends the size of each result as FLARE serialises it."""

    def __init__(self, log_file: str):
        super().__init__()
        self.log_file = log_file

    def process(self, shareable, fl_ctx):
        from nvflare.fuel.utils import fobs

        with open(self.log_file, "a") as handle:
            handle.write(json.dumps({"site": fl_ctx.get_identity_name(), "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
                                     "round": shareable.get_header(AppConstants.CURRENT_ROUND),
                                     "bytes": len(fobs.dumps(shareable))}) + "\n")
        return shareable


def _round_times(server_log: str) -> list[float]:
    """Seconds between consecutive 'Round k started.' records (and the last to 'Finished FedAvg').
    FLARE centres these banners on lines of their own: the record's time is on the line above."""
    stamps, last = [], None
    for line in server_log.splitlines():
        if line[:4].isdigit() and line[4:5] == "-":
            last = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        if last is not None and (("Round " in line and "started." in line) or "Finished FedAvg" in line):
            stamps.append(last)
    return [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]


@contextlib.contextmanager
def _stdout_to_stderr():
    """The simulator and its processes print to fd 1; this script's stdout is one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _job(config: str, sites: list[str], rounds: int, folder: Path, keys: dict):
    from monai.networks.nets import SegResNet
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.job_config.defs import FilterType

    from clinfed.aggregators.fedavg import WeightedFedAvg
    from clinfed.executors.secagg_client import SecAggClient
    from clinfed.jobs.tumour_seg import TASK_CHECK_PERIOD, TASK_REQUEST_INTERVAL
    from clinfed.privacy.secagg import SETUP_TASK, UNMASK_TASK
    from clinfed.workflows.secagg_fedavg import SecAggFedAvg

    model = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=16)
    job = BaseFedJob(initial_model=model, name=f"bench_{config}_{len(sites)}", min_clients=len(sites))
    job.set_app_packages(["clinfed", "fhir_adapter"])
    persistor = job.comp_ids["persistor_id"]
    if config == "plain":
        job.to_server(FedAvg(num_clients=len(sites), num_rounds=rounds, persistor_id=persistor,
                             aggregator=WeightedFedAvg(), task_check_period=TASK_CHECK_PERIOD))
    else:
        dp = config == "secagg_dp"
        job.to_server(SecAggFedAvg(num_clients=len(sites), num_rounds=rounds, persistor_id=persistor,
                                   encoding="dp" if dp else "exact", clip=1.0 if dp else 0.05,
                                   weight_bound=2.0 * SAMPLES * len(sites), noise_multiplier=1.0 if dp else 0.0,
                                   train_timeout=600))
    job.to_server({"server": {"task_request_interval": TASK_REQUEST_INTERVAL}})
    uploads = folder / f"uploads_{config}_{len(sites)}.jsonl"
    for i, site in enumerate(sites):
        trainer = RandomUpdate(fail_every_round=config == "secagg_dropout" and i == len(sites) - 1)
        if config == "plain":
            tasks = ["train"]
            job.to(trainer, site, tasks=tasks)
        else:
            tasks = ["train", SETUP_TASK, UNMASK_TASK]
            key = str(keys[site]) if keys else None  # None: the site's own masking_key_file
            job.to(SecAggClient(trainer=trainer, private_key_file=key), site, tasks=tasks)
        job.to(UploadMeter(str(uploads)), site, filter_type=FilterType.TASK_RESULT, tasks=tasks)
    return job, uploads


def _uploads_per_round(uploads: Path, skip_first: bool = True) -> float | None:
    """Median over sites and rounds (after the first) of the bytes a site uploads in a round."""
    if not uploads.exists():
        return None
    per_site_round: dict[tuple, int] = {}
    for line in uploads.read_text().splitlines():
        entry = json.loads(line)
        if skip_first and entry["round"] in (0, None):
            continue
        key = (entry["site"], entry["round"])
        per_site_round[key] = per_site_round.get(key, 0) + entry["bytes"]
    return statistics.median(per_site_round.values()) if per_site_round else None


def simenv_section(site_counts: list[int], rounds: int) -> dict:
    from clinfed import audit
    from clinfed.ledger.settings import JOB_ID_ENV, LEDGER_ENV, ledger_settings
    from clinfed.site_config import DATA_ROOT_ENV, SITE_CONFIG_FILE

    out = {"model": "MONAI SegResNet init_filters=16", "rounds": rounds,
           "note": "no training: each site returns a random update; round seconds are the median after the "
                   "first round; upload bytes per site per round, all of a round's tasks"}
    for n_sites in site_counts:
        sites = [f"site-{i}" for i in range(1, n_sites + 1)]
        entry = {}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            ledger = folder / "ledger.sqlite"
            audit.init_consortium(ledger, sites)
            keys = {s: folder / s / "masking_key.pem" for s in sites}
            for site in sites:
                with ledger_settings(site, ledger=ledger).open(outbox=False) as client:
                    audit.register_masking_key(client, site, keys[site])
            os.environ[LEDGER_ENV] = str(ledger)
            if n_sites == 3:  # one dropout leaves 2: the sites accept it for this measurement
                for site in sites:
                    policy = {"privacy": {"secure_aggregation": {"min_participants": 2}}}
                    (folder / site / SITE_CONFIG_FILE).write_text(json.dumps(policy))
            os.environ[DATA_ROOT_ENV] = str(folder)
            for config in CONFIGS:
                os.environ[JOB_ID_ENV] = f"bench-{config}-{n_sites}"  # simulator runs all share FLARE's job ID
                job, uploads = _job(config, sites, rounds, folder, keys)
                workspace = folder / f"ws_{config}"
                started = time.perf_counter()
                with _stdout_to_stderr():
                    job.simulator_run(str(workspace), threads=n_sites)
                log = "\n".join(open(p, errors="replace").read()
                                for p in glob.glob(f"{workspace}/server/**/log.txt", recursive=True))
                per_round = _round_times(log)[1:]
                entry[config] = {"round_s": statistics.median(per_round) if per_round else None,
                                 "rounds_s": per_round, "job_wall_s": time.perf_counter() - started,
                                 "upload_bytes_per_site_round": _uploads_per_round(uploads)}
            for name in (LEDGER_ENV, DATA_ROOT_ENV, JOB_ID_ENV):
                os.environ.pop(name, None)
        plain = entry["plain"]
        for config in CONFIGS[1:]:
            if plain["round_s"] and entry[config]["round_s"]:
                entry[config]["round_ratio_to_plain"] = entry[config]["round_s"] / plain["round_s"]
            if plain["upload_bytes_per_site_round"] and entry[config]["upload_bytes_per_site_round"]:
                entry[config]["upload_ratio_to_plain"] = (entry[config]["upload_bytes_per_site_round"]
                                                          / plain["upload_bytes_per_site_round"])
        out[f"{n_sites}_sites"] = entry
    return out


def consortium_section(site_counts: list[int], rounds: int) -> dict:
    import socket

    import yaml

    from clinfed import audit
    from clinfed.consortium import trial
    from clinfed.consortium.provision import load_state, provision
    from clinfed.ledger.settings import ledger_settings

    out = {"model": "MONAI SegResNet init_filters=16", "rounds": rounds,
           "note": "provisioned trial on this machine; no training; BYOC allowed to the lead for the benchmark's "
                   "no-training site only"}
    repo = Path(__file__).resolve().parents[1]
    for n_sites in site_counts:
        entry = {}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            definition = yaml.safe_load((repo / "provisioning" / "consortium.yml").read_text())
            sites = [f"site-{i}" for i in range(1, n_sites + 1)]
            definition["orgs"] = [o for o in definition["orgs"] if o["name"] == "coordinator"] + [
                {"name": f"hospital_{i}"} for i in range(1, n_sites + 1)]
            definition["sites"] = [{"name": s, "org": f"hospital_{i}",
                                    "privacy": {"scopes": ["public"], "default_scope": "public"}}
                                   for i, s in enumerate(sites, 1)]
            definition["admins"] = [a for a in definition["admins"] if a["role"] == "lead"]
            (folder / "consortium.yml").write_text(yaml.safe_dump(definition, sort_keys=False))
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            with _stdout_to_stderr():
                provision(folder / "consortium.yml", folder / "trial", port=port)
            state = load_state(folder / "trial")
            for name in [state["server"], *sites]:  # the benchmark's site is custom code (BYOC)
                authorization = Path(state["kits"][name]) / "local" / "authorization.json"
                policy = json.loads(authorization.read_text())
                policy["permissions"]["lead"]["byoc"] = "any"
                authorization.write_text(json.dumps(policy))
            keys = {}
            for site in sites:
                local = Path(state["kits"][site]) / "local"
                keys[site] = local / "masking_key.pem"
                with ledger_settings(site, site_config_dir=local).open(outbox=False) as client:
                    audit.register_masking_key(client, site, keys[site])
            try:
                with _stdout_to_stderr():
                    trial.up(folder / "trial", sites=sites, timeout=600)
                for config in ("plain", "secagg"):
                    job, _ = _job(config, sites, rounds, folder, keys=None)
                    job.export_job(str(folder / "jobs"))
                    started = time.perf_counter()
                    with trial.admin_session(folder / "trial") as session:
                        job_id = session.submit_job(str(folder / "jobs" / job.name))
                        session.monitor_job(job_id, timeout=1800, poll_interval=1.0)
                        status = session.get_job_meta(job_id)["status"]
                        result = Path(session.download_job_result(job_id))
                    log = "\n".join(p.read_text(errors="replace") for p in result.rglob("log.txt"))
                    per_round = _round_times(log)[1:]
                    entry[config] = {"status": status, "round_s": statistics.median(per_round) if per_round else None,
                                     "rounds_s": per_round, "submit_to_end_s": time.perf_counter() - started}
            finally:
                with _stdout_to_stderr():
                    trial.down(folder / "trial")
        if entry.get("plain", {}).get("round_s") and entry.get("secagg", {}).get("round_s"):
            entry["secagg"]["round_ratio_to_plain"] = entry["secagg"]["round_s"] / entry["plain"]["round_s"]
        out[f"{n_sites}_sites"] = entry
    return out


def utility_section(site_counts: list[int], noise_multipliers: list[float], clip: float, rounds: int) -> dict:
    from clinfed.data.ingest import ingest_site
    from clinfed.data.synth import synthesise
    from clinfed.demo import DemoConfig, new_job_id, prepare_ledger, read_federated_results, run_federated
    from clinfed.jobs.tumour_seg import PRIVATE_JOB_NAME, TumourSegFedAvgRecipe
    from clinfed.ledger.settings import COORDINATOR, ledger_settings
    from clinfed.training import split_cases

    out = {"job": "the demo's federated job with secure aggregation (FusionSegNet, real training)",
           "clip_norm": clip, "note": "federated Dice on the union of the sites' validation patients; "
                                      "site-level epsilon at delta 1e-5 after the job, per site"}
    for n_sites in site_counts:
        config = DemoConfig(sites=n_sites, patients=16, shape=(32, 32, 16), seed=0, rounds=rounds, local_epochs=2,
                            privacy="mask")
        entry = {}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            data = folder / "data"
            synthesise(data, n_sites, config.patients, config.shape, config.seed)
            evaluation = [c for i in range(1, n_sites + 1) for c in split_cases(ingest_site(data / f"site-{i}").cases)[1]]
            for sigma in [None, 0.0, *noise_multipliers]:  # None: plain FedAvg, no secure aggregation
                recipe = TumourSegFedAvgRecipe(name=PRIVATE_JOB_NAME, min_clients=n_sites, num_rounds=rounds,
                                               local_epochs=config.local_epochs, batch_size=config.batch_size,
                                               lr=config.lr, roi=config.roi, cross_site_eval=False,
                                               privacy="none" if sigma is None else "mask",
                                               mask_clip_range=clip if sigma else 0.5,
                                               mask_noise_multiplier=sigma or 0.0)
                ledger = folder / f"ledger_{sigma}.sqlite"
                sites = [f"site-{i}" for i in range(1, n_sites + 1)]
                prepare_ledger(ledger, data, sites, log=lambda message: None, masking_keys=True)
                job_id = new_job_id(f"utility-{n_sites}-{sigma}")
                started = time.perf_counter()
                with _stdout_to_stderr():
                    server_dir = run_federated(data, folder / f"ws_{sigma}", config, ledger_path=ledger, job_id=job_id,
                                               recipe=recipe)
                federated, _ = read_federated_results(server_dir, evaluation, config)
                with ledger_settings(COORDINATOR, ledger=ledger).open(outbox=False) as client:
                    spent = {c.site: c.site_epsilon for c in sorted(client.contributions(job_id), key=lambda c: c.round)}
                seconds = [r["seconds"] for r in federated["per_round"][1:] if r["seconds"]]
                entry["plain" if sigma is None else f"secagg_sigma_{sigma:g}"] = {
                    "dice": federated["dice"], "dice_per_round": [r["dice"] for r in federated["per_round"]],
                    "round_s": statistics.median(seconds) if seconds else None, "site_epsilon": spent,
                    "job_s": time.perf_counter() - started}
            if entry["plain"]["round_s"] and entry["secagg_sigma_0"]["round_s"]:
                entry["secagg_round_ratio_to_plain"] = entry["secagg_sigma_0"]["round_s"] / entry["plain"]["round_s"]
        out[f"{n_sites}_sites"] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--consortium", type=int, nargs="*", default=[],
                        help="also measure a provisioned trial consortium of these sizes (minutes each)")
    parser.add_argument("--utility", action="store_true", help="also measure the model update DP leaves (minutes)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--skip-timing", action="store_true", help="only the sections asked for besides timing")
    args = parser.parse_args()
    started = time.perf_counter()
    report = {"benchmark": "secagg", "host": platform.node(), "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "goals": {"round_ratio_to_plain": 1.15, "upload_ratio_to_plain": 2.0},
              "anchors": {"flare_he_round_ratio": {"3_sites": 11, "10_sites": 22},
                          "flower_secaggplus_round_ratio": {"3_sites": 4.0, "10_sites": "4.5-5.9"},
                          "bonawitz_upload_ratio": 1.73},
              "simenv": None if args.skip_timing else simenv_section(args.sites, args.rounds)}
    if args.utility:
        report["update_dp_utility"] = utility_section(args.sites, args.noise, args.clip, args.rounds)
    if args.consortium:
        report["provisioned_consortium"] = consortium_section(args.consortium, args.rounds)
    report["wall_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
