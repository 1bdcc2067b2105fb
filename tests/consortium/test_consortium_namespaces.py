"""The trial as hospitals on separate hosts: the FLARE server and each site in a Linux network
namespace of its own, with its own address, connected over a bridge; a private job across them
with the local ledger (a file every namespace reaches), verified by each site."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from consortium_helpers import consortium_dict, export_private_job, free_port, write_consortium

from clinfed import audit
from clinfed.consortium import namespaces, trial
from clinfed.consortium.cli import add_consortium_commands
from clinfed.consortium.provision import load_state
from clinfed.ledger.settings import COORDINATOR, ledger_settings

SITES = ["site-1", "site-2", "site-3"]
pytestmark = pytest.mark.timeout(900)


def unused_subnet() -> str:
    """A /24 of 10.213.0.0/16 that this machine neither routes nor holds a trial bridge for."""
    routes = json.loads(subprocess.run(["ip", "-4", "-j", "route", "show", "table", "all"], capture_output=True,
                                       text=True, check=True).stdout or "[]")
    routed = [ipaddress.IPv4Network(r["dst"], strict=False) for r in routes if "/" in r.get("dst", "")]
    for third in random.sample(range(2, 250), 248):
        subnet = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if not any(subnet.overlaps(net) for net in routed) and \
                subprocess.run(["ip", "link", "show", f"clf{third}br"], capture_output=True).returncode != 0:
            return f"10.213.{third}"
    raise RuntimeError("no unused /24 in 10.213.0.0/16")


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="clinfed")
    add_consortium_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    from clinfed.cli import main
    from clinfed.data.synth import synthesise

    root = tmp_path_factory.mktemp("netns")
    out, data = root / "trial", root / "data"
    synthesise(data, 4, 10, (32, 32, 16), 1)
    subnet = unused_subnet()
    definition = consortium_dict()
    definition["coordinator"]["host"] = f"{subnet}.10"  # the server's own address, and its certificate's name
    definition["coordinator"]["client_outcome_wait_timeout"] = 15
    # A port free on this machine's own network, so that finding it closed here says the server
    # is elsewhere (in its namespace), not that nobody else listens.
    assert _cli("consortium", "provision", str(write_consortium(root / "consortium.yml", definition)), "--out",
                str(out), "--data-root", str(data), "--port", str(free_port()), "--json") == 0
    state = load_state(out)
    for site in state["sites"]:
        site_config = Path(state["kits"][site]) / "local" / "clinfed_site.json"
        assert main(["keys", "register", "--site", site, "--site-config", str(site_config), "--json"]) == 0
        with ledger_settings(site, site_config_dir=site_config.parent).open(outbox=False) as ledger:
            assert audit.sync_consents(data / site, ledger, site).active > 0
    try:
        assert _cli("consortium", "up", str(out), "--netns", "--sites", *SITES, "--json") == 0
        yield {"out": out, "state": state, "placement": namespaces.load(out / trial.RUN_DIR)}
    finally:
        assert _cli("consortium", "down", str(out), "--json") == 0
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"clf{subnet.split('.')[2]}-" not in left  # `down` removed the namespaces


def test_each_participant_runs_on_a_host_of_its_own(hosts):
    placement, running = hosts["placement"], trial.recorded_processes(hosts["out"])
    seen = {}
    for name in [hosts["state"]["server"], *SITES]:
        seen[name] = namespaces.netns_of_process(running[name])
        assert seen[name] == namespaces.netns_id(placement.host(name).netns), name
    assert len(set(seen.values())) == 4 and namespaces.netns_of_process(os.getpid()) not in seen.values()
    # The server listens at its own address only: this machine's loopback does not have it.
    server_address = placement.host(hosts["state"]["server"]).address
    port = hosts["state"]["port"]
    socket.create_connection((server_address, port), timeout=5).close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_private_job_across_namespaces_and_each_site_verifies_it(hosts, tmp_path):
    out, state = hosts["out"], hosts["state"]
    job_dir = export_private_job(tmp_path / "jobs", num_rounds=1)
    with trial.admin_session(out) as session:  # the lead's console, from this machine, over the bridge
        started = time.monotonic()
        job_id = session.submit_job(str(job_dir))
        session.monitor_job(job_id, timeout=420, poll_interval=1.0)
        meta = session.get_job_meta(job_id)
        assert meta["status"] == "FINISHED:COMPLETED", trial.status_text(trial.status(out, query_server=False))
        model_file = next(Path(session.download_job_result(job_id)).rglob("FL_global_model.pt"))
    for participant in [*SITES, COORDINATOR]:
        kit = state["kits"][state["server"] if participant == COORDINATOR else participant]
        with ledger_settings(participant, site_config_dir=Path(kit) / "local").open(outbox=False) as ledger:
            verified = audit.verify(ledger, job_id, model_file)
            assert verified.ok and verified.matched_rounds == [0], (participant, verified.job.problems)
    print(f"tiny private job across namespaces, 1 round: {time.monotonic() - started:.1f} s")
