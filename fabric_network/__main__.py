"""python -m fabric_network {install,up,status,stop,start,down} -- see fabric_network/README.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .binaries import DEFAULT_VERSION, install
from .errors import FabricNetworkError
from .network import DEFAULT_SITES, Network

DEFAULT_ROOT = os.environ.get("CLINFED_FABRIC_NETWORK",
                              str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                  / "clinfed" / "network"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabric_network", description=__doc__)
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"network folder (default {DEFAULT_ROOT}; "
                        "env CLINFED_FABRIC_NETWORK)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="build or reuse the pinned Fabric binaries; prints the install folder")
    p.add_argument("--version", default=DEFAULT_VERSION)
    p = sub.add_parser("up", help="generate, start, create the channel, deploy the chaincode")
    p.add_argument("--sites", default=",".join(DEFAULT_SITES), help="comma-separated site names")
    p.add_argument("--bft", action="store_true", help="four SmartBFT orderers instead of one Raft orderer")
    p.add_argument("--batch-timeout", default="200ms")
    p.add_argument("--observers", default="", help="comma-separated extra channel orgs with no role (tests)")
    p.add_argument("--version", default=DEFAULT_VERSION)
    sub.add_parser("down", help="stop every process of the network, delete its folder, free its addresses")
    sub.add_parser("stop", help="stop every process, keep the folder")
    sub.add_parser("start", help="start the processes of a stopped network again")
    sub.add_parser("status", help="print the network's nodes and whether they run (JSON)")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(install(args.version))
        elif args.command == "up":
            if (Path(args.root) / "network.json").exists():
                raise FabricNetworkError(f"{args.root} already holds a network; `down` it first or pass another --root")
            t0 = time.monotonic()
            net = Network.create(args.root, sites=[s for s in args.sites.split(",") if s],
                                 consensus="bft" if args.bft else "raft", batch_timeout=args.batch_timeout,
                                 version=args.version,
                                 observers=[o for o in args.observers.split(",") if o])
            net.up(log=lambda m: print(m, file=sys.stderr))
            print(json.dumps({**net.status(), "seconds": round(time.monotonic() - t0, 1)}, indent=2))
        elif args.command == "down":
            Network.load(args.root).down()
        elif args.command == "stop":
            Network.load(args.root).stop()
        elif args.command == "start":
            Network.load(args.root).start()
        elif args.command == "status":
            print(json.dumps(Network.load(args.root).status(), indent=2))
    except FabricNetworkError as exc:
        print(f"fabric_network: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
