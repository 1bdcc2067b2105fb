"""What the audit ledger costs a consortium: commit latency under a federated round's load, bytes
per round, the time of `audit verify` on a long job, and the share of a round's wall time the
ledger adds on its critical path (writes go through the asynchronous outbox).

Prints one JSON object. Not a test: it takes a few minutes.

    .venv/bin/python benchmarks/ledger.py [--rounds 20] [--verify-rounds 100] [--flare] [--fabric]

* LocalLedger always: each site is a thread with its own client (its own SQLite connection and
  key), all sites write their round's contribution at once, then the coordinator its model.
* ``--fabric``: the same on Fabric Raft and BFT networks, where ``fabric_network`` finds the
  binaries: a network of 10 sites (11 peer orgs, each with its own chaincode service) carries
  ``--verify-rounds`` rounds (latency, bytes, `audit verify` of that job, the outbox), one of 3
  sites ``--rounds`` rounds (bytes); tens of minutes on 2 cores.
* ``--flare``: FLARE's own no-op FedAvg round time at 10 sites for the same model, measured in
  this run (``round_overhead.floor_round_seconds``), as the denominator of the ledger's share of
  a round (the outbox's blocking time per round) on every backend measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from clinfed import audit
from clinfed.ledger import Contribution, GlobalModel, LocalLedger, OutboxLedger
from clinfed.ledger.settings import COORDINATOR_MSP, msp_id_for


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _contribution(job: str, round_: int, site: str) -> Contribution:
    return Contribution(job_id=job, round=round_, site=site, update_sha256=_digest(f"{job}/{round_}/{site}"),
                        n_samples=40, metrics={"train_loss": 0.41, "val_dice": 0.72, "cohort_train": 16.0},
                        patient_epsilon=1.25, patient_delta=1e-5)


def _model(job: str, round_: int, sites: list[str]) -> GlobalModel:
    return GlobalModel(job_id=job, round=round_, model_sha256=_digest(f"model/{job}/{round_}"), participants=sites,
                       expected_sites=sites, aggregation="fedavg", n_samples=40 * len(sites), patient_epsilon=1.25,
                       metrics={"val_dice": 0.7})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_rounds(open_as, job: str, sites: list[str], rounds: int) -> dict:
    """Each round: every site writes its contribution concurrently, then the coordinator its model.
    Returns commit latencies (s) and the round times."""
    clients = {site: open_as(msp_id_for(site)) for site in sites}
    coordinator = open_as(COORDINATOR_MSP)
    latencies, round_times = [], []
    for round_ in range(rounds):
        started = time.perf_counter()
        errors: list = []

        def write(site):
            t0 = time.perf_counter()
            try:
                clients[site].record_contribution(_contribution(job, round_, site))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=write, args=(site,)) for site in sites]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        t0 = time.perf_counter()
        coordinator.record_global_model(_model(job, round_, sites))
        latencies.append(time.perf_counter() - t0)
        round_times.append(time.perf_counter() - started)
    for client in [*clients.values(), coordinator]:
        client.close()
    return {"latencies": latencies, "round_seconds": round_times}


def _file_bytes(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def local_ledger(work: Path, n_sites: int) -> tuple[Path, list[str]]:
    sites = [f"site-{i}" for i in range(1, n_sites + 1)]
    path = work / f"ledger-{n_sites}.sqlite"
    audit.init_consortium(path, sites)
    return path, sites


def local_latency_and_size(work: Path, rounds: int) -> dict:
    out = {}
    for n_sites in (3, 10):
        path, sites = local_ledger(work, n_sites)
        before = _file_bytes(path)
        measured = run_rounds(lambda msp: LocalLedger(path, msp), "job-bench", sites, rounds)
        after = _file_bytes(path)
        lat = measured["latencies"]
        out[f"{n_sites}_sites"] = {
            "commit_p50_s": round(percentile(lat, 0.5), 4), "commit_p95_s": round(percentile(lat, 0.95), 4),
            "transactions": len(lat), "round_ledger_seconds_median": round(statistics.median(measured["round_seconds"]), 4),
            "bytes_per_round": round((after - before) / rounds),
            "bytes_per_transaction": round((after - before) / len(lat)),
        }
    return out


def local_verify_time(work: Path, verify_rounds: int, n_sites: int = 10) -> dict:
    (work / "verify").mkdir()
    path, sites = local_ledger(work / "verify", n_sites)
    writers = {site: LocalLedger(path, msp_id_for(site)) for site in sites}
    coordinator = LocalLedger(path, COORDINATOR_MSP)
    t0 = time.perf_counter()
    for round_ in range(verify_rounds):
        for site in sites:
            writers[site].record_contribution(_contribution("job-long", round_, site))
        coordinator.record_global_model(_model("job-long", round_, sites))
    build = time.perf_counter() - t0
    for client in [*writers.values(), coordinator]:
        client.close()
    # A site operator's `audit verify`: a fresh process would open the ledger (replaying and
    # checking every block) and stream the job's records.
    t0 = time.perf_counter()
    with LocalLedger(path, msp_id_for(sites[0])) as reader:
        reader.verify()
        replayed = time.perf_counter() - t0
        result = audit.verify(reader, "job-long")
    total = time.perf_counter() - t0
    assert result.ok and result.job.rounds == verify_rounds, result.job.problems
    return {"rounds": verify_rounds, "sites": n_sites, "records": result.job.records, "blocks": verify_rounds * (n_sites + 1) + 2,
            "seconds": round(total, 3), "replay_seconds": round(replayed, 3),
            "build_seconds": round(build, 2), "ledger_bytes": _file_bytes(path)}


def outbox_blocking(work: Path, rounds: int, n_sites: int = 10) -> dict:
    (work / "outbox").mkdir()
    path, sites = local_ledger(work / "outbox", n_sites)
    return outbox_blocking_on(lambda msp: LocalLedger(path, msp), sites, work / "outbox", rounds,
                              lambda: LocalLedger(path, COORDINATOR_MSP))


def outbox_blocking_on(open_as, sites: list[str], folder: Path, rounds: int, open_reader) -> dict:
    """What a round waits for: the site's contribution filter and the coordinator's recorder each
    journal their write (fsynced) and go on; delivery happens on the outbox's own thread."""
    folder.mkdir(parents=True, exist_ok=True)
    ledgers = {p: OutboxLedger(open_as(msp), folder / f"{p}.jsonl", policy="async")
               for p, msp in [(s, msp_id_for(s)) for s in sites] + [("coordinator", COORDINATOR_MSP)]}
    per_round = []
    for round_ in range(rounds):
        site_blocking = []
        for site in sites:  # sites run in parallel in a real round: the slowest one is on the path
            t0 = time.perf_counter()
            ledgers[site].record_contribution(_contribution("job-async", round_, site))
            site_blocking.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ledgers["coordinator"].record_global_model(_model("job-async", round_, sites))
        per_round.append(max(site_blocking) + time.perf_counter() - t0)
    remaining = sum(ledger.close(timeout=120.0) for ledger in ledgers.values())
    assert remaining == 0
    with open_reader() as reader:
        assert len(reader.contributions("job-async")) == rounds * len(sites)
    return {"sites": len(sites), "rounds": rounds,
            "blocking_seconds_per_round_median": round(statistics.median(per_round), 5),
            "blocking_seconds_per_round_max": round(max(per_round), 5)}


def fabric_section(consensus: str, rounds: int, verify_rounds: int, work: Path) -> dict:
    """On a fresh network per size: at 10 sites, ``verify_rounds`` rounds of load (commit latency,
    bytes per round), then a site operator's `audit verify` of that job and the outbox's blocking
    time per round; at 3 sites, ``rounds`` rounds for bytes per round."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fabric_network import testing

    out = {}
    for n_sites in (10, 3):
        started = time.perf_counter()
        net = testing.start_network(consensus, sites=[f"site-{i}" for i in range(1, n_sites + 1)])
        try:
            section = out[f"{n_sites}_sites"] = {"peer_orgs": len(net.peers), "network_up_seconds":
                                                 round(time.perf_counter() - started, 1)}
            sites = list(net.spec.sites)
            n_rounds = verify_rounds if n_sites == 10 else rounds
            sizes_before = _fabric_bytes(net)
            measured = run_rounds(lambda msp: net.clients.ledger(msp), "job-bench", sites, n_rounds)
            sizes_after = _fabric_bytes(net)
            lat = measured["latencies"]
            section.update({
                "rounds": n_rounds, "transactions": len(lat),
                "commit_p50_s": round(percentile(lat, 0.5), 4), "commit_p95_s": round(percentile(lat, 0.95), 4),
                "commit_max_s": round(max(lat), 4),
                "round_ledger_seconds_median": round(statistics.median(measured["round_seconds"]), 4),
                "bytes_per_round_per_peer": round((sizes_after - sizes_before) / n_rounds / len(net.peers))})
            if n_sites == 10:
                # A site operator's `audit verify`: its own org's gateway, records streamed a page at a time.
                reader = net.clients.ledger(msp_id_for(sites[0]))
                t0 = time.perf_counter()
                result = audit.verify(reader, "job-bench")
                section["audit_verify"] = {"rounds": n_rounds, "sites": n_sites, "records": result.job.records,
                                           "seconds": round(time.perf_counter() - t0, 3)}
                assert result.ok and result.job.rounds == n_rounds, result.job.problems
                reader.close()
                section["outbox"] = outbox_blocking_on(
                    lambda msp: net.clients.ledger(msp), sites, work / f"outbox-{consensus}", rounds,
                    lambda: net.clients.ledger(COORDINATOR_MSP))
        finally:
            net.down()
    return out


def _fabric_bytes(net) -> int:
    return sum(p.stat().st_size for peer in net.peers
               for p in (net.root / "data" / peer / "ledgersData" / "chains").rglob("blockfile*"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds for latency and size")
    parser.add_argument("--verify-rounds", type=int, default=100)
    parser.add_argument("--flare", action="store_true", help="measure FLARE's no-op round time in this run")
    parser.add_argument("--fabric", action="store_true", help="also on Fabric Raft and BFT (needs the binaries)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clinfed-ledger-bench-") as tmp:
        work = Path(tmp)
        result = {"local": {"latency_and_size": local_latency_and_size(work, args.rounds),
                            "audit_verify": local_verify_time(work, args.verify_rounds),
                            "outbox": outbox_blocking(work, args.rounds)}}
        if args.flare:  # first: it is the denominator, and the quicker to fail
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from round_overhead import floor_round_seconds

            (work / "flare").mkdir()
            floor = floor_round_seconds(work / "flare", 10, 4)[1:]  # rounds after the first
            result["flare_round_seconds_median"] = round(statistics.median(floor), 3)
        if args.fabric:
            from fabric_network import installed_home

            if installed_home() is None:
                result["fabric"] = "not measured: no Fabric binaries on this machine (fabric_network/README.md)"
            else:
                result["fabric"] = {c: fabric_section(c, args.rounds, args.verify_rounds, work) for c in ("raft", "bft")}
        if args.flare:
            outboxes = [result["local"]["outbox"]] + ([s["10_sites"]["outbox"] for s in result["fabric"].values()]
                                                      if isinstance(result.get("fabric"), dict) else [])
            for section in outboxes:
                section["fraction_of_round"] = round(section["blocking_seconds_per_round_median"]
                                                     / result["flare_round_seconds_median"], 5)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
