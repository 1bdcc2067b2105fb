"""``clinfed consortium provision|up|down|status``: registered on the main parser by
:func:`add_consortium_commands`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print(args, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=2) if getattr(args, "json", False) else text)


def cmd_provision(args) -> int:
    from .provision import provision

    log = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda m: None)
    result = provision(args.consortium_yml, args.out, data_root=args.data_root, port=args.port, log=log)
    lines = [f"provisioned {result.consortium.name} into {result.out} in {result.seconds:.1f} s"]
    lines += [f"  {name:<28} {path}" for name, path in result.kits.items()]
    if result.ledger_file:
        lines.append(f"  ledger: {result.ledger_file} (consortium initialised; each site registers its masking key: clinfed keys register)")
    lines.append(f"next: clinfed consortium up {result.out}")
    _print(args, result.to_dict(), "\n".join(lines))
    return 0


def cmd_up(args) -> int:
    from .trial import up, up_in_namespaces

    log = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda m: None)
    result = (up_in_namespaces if args.netns else up)(args.dir, sites=args.sites, timeout=args.timeout, log=log)
    _print(args, result.to_dict(), f"server and {len(result.sites)} site(s) up and connected after "
                                   f"{result.seconds_to_connected:.1f} s: {', '.join(result.sites)}")
    return 0


def cmd_down(args) -> int:
    from .trial import down, remove_namespaces

    log = (lambda m: print(m, file=sys.stderr)) if not args.json else (lambda m: None)
    stopped = down(args.dir, names=args.participants, log=log)
    if not args.participants:
        remove_namespaces(args.dir, log=log)
    _print(args, {"stopped": stopped}, f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def cmd_status(args) -> int:
    from .trial import status, status_text

    report = status(args.dir)
    _print(args, report, status_text(report))
    return 0


def add_consortium_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``consortium provision|up|down|status`` to a parser's subcommands."""
    consortium = subparsers.add_parser("consortium", help="provision and run a FLARE consortium from consortium.yml")
    sub = consortium.add_subparsers(dest="consortium_command", required=True)

    p = sub.add_parser("provision", help="startup kits, site policies and Fabric org list from a consortium file")
    p.add_argument("consortium_yml", type=Path, metavar="CONSORTIUM_YML")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder: new or empty (a failed provisioning removes what it wrote)")
    p.add_argument("--data-root", type=Path, metavar="DIR",
                   help="trial on one machine: each site's data folder is DIR/<site> (else /data/clinfed/<site>, "
                        "for the site operator to edit in local/clinfed_site.json)")
    p.add_argument("--port", type=int, help="override the server's port from the consortium file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("up", help="start the server and sites of a provisioned consortium on this machine")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--sites", nargs="+", metavar="SITE", help="only these sites (default: all)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the sites to connect")
    p.add_argument("--netns", action="store_true",
                   help="each participant on a host of its own: a Linux network namespace with its own address "
                        "(needs root; coordinator.host must be an IPv4 address, the server's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop what `consortium up` started (all: and remove its network namespaces)")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("participants", nargs="*", metavar="PARTICIPANT", help="only these (default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="processes, connected sites, jobs and why a failed job failed")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    return consortium
