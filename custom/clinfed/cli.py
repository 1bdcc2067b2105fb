"""The ``clinfed`` command line: ``data synth``, ``data check``, ``demo``, ``consent sync``, ``audit ...``.

Tables for people, ``--json`` for scripts; progress bars go to stderr so stdout stays parseable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sqlite3
import sys
from pathlib import Path

from tqdm import tqdm

from clinfed.errors import ClinfedError, FhirInputError
from clinfed.consortium.cli import add_consortium_commands
from clinfed.privacy import PRIVACY_MODES


def _shape(text: str) -> tuple[int, int, int]:
    try:
        x, y, z = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape must be X,Y,Z integers, got {text!r}") from None
    if min(x, y, z) < 4:
        raise argparse.ArgumentTypeError(f"--shape sides must be >= 4, got {text!r}")
    return x, y, z


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_data_synth(args) -> int:
    from clinfed.data.synth import synthesise

    with tqdm(total=args.sites * args.patients, desc="synthesising patients", unit="pt",
              file=sys.stderr, disable=args.json) as bar:
        truth = synthesise(args.out, args.sites, args.patients, args.shape, args.seed, study_id=args.study,
                           progress=bar)
    summary = {site: {"patients": len(cases), "dir": str(args.out / site)} for site, cases in truth.items()}
    if args.json:
        print(json.dumps({"out": str(args.out), "sites": summary}, indent=2))
    else:
        for site, info in summary.items():
            print(f"{site}: {info['patients']} patients -> {info['dir']}")
    return 0


def print_ingestion_report(report: dict) -> None:
    print(f"== {report['site']} (study {report['study']}) ==")
    print(f"  usable patients:   {report['usable']}")
    print(f"  excluded patients: {report['excluded']}")
    for reason, count in report["excluded_by_reason"].items():
        print(f"    {reason:<32} {count}")
    for exclusion in report["exclusions"]:
        print(f"    - {exclusion['subject']}: {exclusion['reason']} ({exclusion['detail']})")
    if report["fhir_issues"]:
        print(f"  FHIR resources skipped: {len(report['fhir_issues'])}")
        for issue in report["fhir_issues"]:
            print(f"    - {issue}")


def _check_site(site_dir: Path, args) -> dict:
    from clinfed.data.ingest import ingest_site
    from clinfed.data.pseudonym import Pseudonymiser

    if not (site_dir / "imaging").is_dir() and not (site_dir / "fhir").is_dir():
        raise ClinfedError(f"{site_dir}: not a site folder (expected imaging/ and fhir/ inside)")
    pseudonymiser = Pseudonymiser.for_site(site_dir, args.secret_file)
    n_studies = len(list((site_dir / "imaging").glob("*/"))) if (site_dir / "imaging").is_dir() else 0
    with tqdm(total=n_studies, desc=f"ingesting {site_dir.name}", unit="study", file=sys.stderr,
              disable=args.json) as bar:
        ingestion = ingest_site(site_dir, args.study, pseudonymiser, progress=bar)
    return ingestion.report()


def cmd_data_check(args) -> int:
    """Every site is checked, whatever another one's error; exit 2 when any site could not be."""
    reports, failed = [], 0
    for site_dir in args.site_dirs:
        try:
            reports.append(_check_site(site_dir, args))
        except USER_ERRORS as err:
            failed += 1
            message = user_error_message(err)
            reports.append({"site_dir": str(site_dir), "error": message})
            print(f"clinfed: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        for report in reports:
            if "error" in report:
                print(f"== {report['site_dir']}: NOT CHECKED (error above) ==")
            else:
                print_ingestion_report(report)
    if len(reports) > 1:
        print(f"{len(reports) - failed} of {len(reports)} site(s) checked"
              + (f"; {failed} could not be (see above)" if failed else ""), file=sys.stderr)
    return 2 if failed else 0


def cmd_demo(args) -> int:
    from clinfed.demo import ConsoleWatcher, DemoConfig, closing_lines, run_demo
    from clinfed.report import results_table

    config = DemoConfig.quick(args.study) if args.quick else DemoConfig(study=args.study)
    if args.rounds:
        config = DemoConfig(**{**config.__dict__, "rounds": args.rounds})
    config = DemoConfig(**{**config.__dict__, "privacy": args.privacy})
    out = sys.stderr if args.json else sys.stdout
    results = run_demo(args.out, config, ConsoleWatcher(config.rounds, out=out), verbose=args.verbose)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print()
        print(results_table(results))
    print("\n".join(closing_lines(args.out, results, args.quick)), file=out)
    return 0


def _ledger_settings(args, participant: str | None):
    """The ledger ``--ledger`` / ``--site-config`` / ``$CLINFED_LEDGER`` names, acting as
    ``participant`` (``--as``, or the site a command writes for; None: the configuration's own).

    A participant acts only with its own identity: with ``--site-config`` it must be the one the
    configuration holds; with a ledger file alone it must have its credential beside the file (a
    simulator's ledger), else the ledger refuses to open as it.
    """
    from clinfed.ledger.settings import COORDINATOR, LEDGER_ENV, ledger_settings, msp_id_for, site_config_ledger
    from clinfed.site_config import SITE_CONFIG_FILE

    if args.site_config:
        if not args.site_config.is_file():
            raise ClinfedError(f"{args.site_config}: site config not found")
        settings = site_config_ledger(participant or "", args.site_config)
        if settings is None:
            raise ClinfedError(f"{args.site_config}: has no 'ledger' section")
        owner = settings.identity_of
        if owner is None:  # an older configuration: its MSP ID says whose identity it holds
            owner = participant if participant and msp_id_for(participant) == settings.msp_id else None
        if participant and participant != owner:
            raise ClinfedError(f"--as/--site {participant}: {args.site_config} holds the ledger identity of "
                               f"{owner or settings.msp_id}, not of {participant}; a participant acts on the ledger "
                               f"only as itself, with its own key")
        if owner is None:
            raise ClinfedError(f"{args.site_config}: its ledger section names no 'participant'; pass --as")
        settings = dataclasses.replace(settings, participant=owner)
        if args.ledger:
            if settings.backend != "local":
                raise ClinfedError(f"--ledger {args.ledger}: a ledger file is for the local backend; "
                                   f"{args.site_config} configures a {settings.backend} ledger")
            settings = dataclasses.replace(settings, config={**settings.config, "path": str(args.ledger.resolve())})
        return settings
    participant = participant or COORDINATOR
    if args.ledger:
        if args.ledger.suffix.lower() != ".json" and not args.ledger.is_file():
            raise ClinfedError(f"--ledger {args.ledger}: no ledger file there; a ledger is created only by "
                               f"`clinfed consortium provision` (or the demo): check the path")
        return ledger_settings(participant, ledger=args.ledger)
    settings = ledger_settings(participant)
    if settings is None:
        raise ClinfedError(f"no ledger given: use --site-config local/{SITE_CONFIG_FILE} (your ledger identity), "
                           f"--ledger FILE (a simulator's LocalLedger .sqlite or a ledger .json), or set ${LEDGER_ENV}")
    return settings


def _announced_settings(args, participant: str | None):
    """``_ledger_settings``, saying on stderr which ledger and identity (unless ``--json``)."""
    settings = _ledger_settings(args, participant)
    if not args.json:
        print(f"# {settings.describe()}", file=sys.stderr)
    return settings


def _open_ledger(args, participant: str | None):
    return _announced_settings(args, participant).open(outbox=False)


def cmd_consent_sync(args) -> int:
    from clinfed.site_setup import consent_sync

    site = args.site or args.site_dir.resolve().name
    report = consent_sync(_announced_settings(args, site), args.site_dir, site, args.study, args.secret_file)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(f"{site}, study {report.study}: {report.published} consent(s) published, {report.unchanged} unchanged; "
              f"now {report.active} active, {report.revoked} revoked; {report.no_consent} patient(s) without a "
              f"consent for the study (not published)")
        if report.missing_from_export:
            print(f"warning: {report.missing_from_export} consent(s) on the ledger have no deciding Consent in the "
                  f"export any more; they stay as recorded until the export revokes them")
    return 0


def cmd_keys_register(args) -> int:
    from clinfed.site_config import site_files
    from clinfed.site_setup import keys_register

    key_file = args.key_file
    if key_file is None:
        if not args.site_config:
            raise ClinfedError("give --key-file, or --site-config to use the site's masking_key_file")
        key_file = site_files(args.site, args.site_config.parent).masking_key_file
    public, new = keys_register(_announced_settings(args, args.site), args.site, key_file)
    if args.json:
        print(json.dumps({"site": args.site, "key_file": str(key_file), "public_key": public, "registered": new}))
    else:
        print(f"{args.site}: masking key {key_file} (public {public[:16]}...) "
              + ("registered on the ledger; it applies from the next job this site starts" if new
                 else "already registered on the ledger"))
    return 0


def cmd_audit_contributions(args) -> int:
    from clinfed import audit

    with _open_ledger(args, args.participant) as ledger:
        rows = audit.contributions(ledger, args.job)
    print(json.dumps(rows, indent=2) if args.json else audit.contributions_table(rows))
    return 0


def cmd_audit_models(args) -> int:
    from clinfed import audit

    with _open_ledger(args, args.participant) as ledger:
        rows = audit.models(ledger, args.job)
    print(json.dumps(rows, indent=2) if args.json else audit.models_table(rows))
    return 0


def cmd_audit_consents(args) -> int:
    from clinfed import audit

    with _open_ledger(args, args.participant) as ledger:
        if args.counts:
            counts = audit.consent_counts(ledger, args.study)
            print(json.dumps(counts, indent=2) if args.json else audit.consent_counts_table(counts))
            return 0
        rows = audit.consents(ledger, args.study, site=args.site, pseudonym=args.pseudonym)
    print(json.dumps(rows, indent=2) if args.json else audit.consents_table(rows))
    return 0


def cmd_audit_verify(args) -> int:
    from clinfed import audit

    with _open_ledger(args, args.participant) as ledger:
        result = audit.verify(ledger, args.job, args.model, args.round)
    print(json.dumps(result.to_dict(), indent=2) if args.json else audit.verification_text(result))
    return 0 if result.ok else 1


def cmd_audit_watch(args) -> int:
    import dataclasses

    from clinfed import audit

    with _open_ledger(args, args.participant) as ledger:
        start = args.from_block
        if start is None:  # live: from the next block on
            height = getattr(ledger, "height", None)
            start = height() + 1 if callable(height) else 0

        def emit(event):
            print(json.dumps(dataclasses.asdict(event), sort_keys=True) if args.json else audit.event_line(event),
                  flush=True)

        try:
            audit.watch(ledger, start, follow=not args.no_follow, timeout=args.timeout, emit=emit)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_audit_serve(args) -> int:
    from clinfed.audit_web import serve

    settings = _announced_settings(args, args.participant)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: anyone who can reach this address reads the ledger as "
              f"{settings.participant}", file=sys.stderr)

    def ready(url: str) -> None:
        if args.json:
            print(json.dumps({"url": url, "participant": settings.participant}), flush=True)
        else:
            print(f"audit view of {settings.participant}: {url} (read-only; Ctrl-C stops it)", flush=True)

    try:
        serve(settings, args.study, args.host, args.port, on_ready=ready)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_eval_privacy(args) -> int:
    from clinfed.evaluation.federation import Recipe
    from clinfed.evaluation.membership import audit_data_folder, figures_table

    try:
        recipe = Recipe(rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr,
                        roi=args.roi, dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta)
    except ValueError as err:
        raise ClinfedError(f"eval privacy: {err}") from None
    with tqdm(total=args.models, desc="training shadow federations", unit="model", file=sys.stderr,
              disable=args.json) as bar:
        report = audit_data_folder(args.data, recipe, site=args.site, n_models=args.models, seed=args.seed,
                                   model_file=args.model, study=args.study, progress=lambda k: bar.update(1))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"membership inference against {report['target']}")
        print(figures_table(report["attacks"]))
    return 0


def cmd_jobs_export(args) -> int:
    from clinfed.jobs.tumour_seg import export_jobs

    for path in export_jobs(args.jobs_dir):
        print(f"exported {path}")
    return 0


def cmd_jobs_check(args) -> int:
    from clinfed.jobs.folder_check import check_job_folder

    checks = [check_job_folder(job_dir) for job_dir in args.job_dirs]
    if args.json:
        print(json.dumps([c.to_dict() for c in checks] if len(checks) > 1 else checks[0].to_dict(), indent=2))
    else:
        for check in checks:
            if check.ok:
                print(f"{check.job_dir}: OK ({check.components} components load and accept their arguments)")
            for problem in check.problems:
                print(f"clinfed: error: {problem}", file=sys.stderr)
    return 0 if all(c.ok for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    from clinfed.data.profiles import STUDY_ID

    parser = argparse.ArgumentParser(prog="clinfed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="synthesise or check site data").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic non-IID sites (DICOM + SEG + FHIR Bulk NDJSON)")
    synth.add_argument("--out", type=Path, required=True, help="folder that receives one folder per site")
    synth.add_argument("--sites", type=_positive, default=3)
    synth.add_argument("--patients", type=_positive, default=24, help="patients per site")
    synth.add_argument("--shape", type=_shape, default=(48, 48, 24), help="volume size X,Y,Z in voxels")
    synth.add_argument("--study", default=STUDY_ID, help="whose generator profile: clinfed-tumour-seg (liver CT) or "
                                                          "brain-mr-tumour")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--json", action="store_true")
    synth.set_defaults(func=cmd_data_synth)

    check = data.add_parser("check", help="ingest site folders and report usable and excluded patients")
    check.add_argument("site_dirs", type=Path, nargs="+", metavar="SITE_DIR")
    check.add_argument("--study", default=STUDY_ID, help="study definition: a name under provisioning/studies "
                                                          "(or $CLINFED_STUDIES_DIR), or a .yml file")
    check.add_argument("--secret-file", type=Path, help="site pseudonymisation key (default SITE_DIR/site_secret.key)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_data_check)

    demo = sub.add_parser("demo", help="synthetic 3-site run: centralised vs local-only vs federated (FLARE SimEnv)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for data, FLARE workspace, results")
    demo.add_argument("--quick", action="store_true", help="small data and 6 rounds (under 3 minutes): a smoke test")
    demo.add_argument("--rounds", type=_positive, help="override the number of federated rounds")
    demo.add_argument("--privacy", choices=PRIVACY_MODES, default="none",
                      help="federated arm: DP-SGD at every site (dp), secure masking (mask), or both")
    demo.add_argument("--study", default=STUDY_ID, help="the study to run: clinfed-tumour-seg (liver CT, default) "
                                                         "or brain-mr-tumour")
    demo.add_argument("--verbose", action="store_true", help="FLARE's full logs on the console too (they always go "
                                                            "to files in the output folder)")
    demo.add_argument("--json", action="store_true", help="print results.json to stdout")
    demo.set_defaults(func=cmd_demo)

    ledger_options = argparse.ArgumentParser(add_help=False)
    ledger_options.add_argument("--ledger", type=Path,
                                help="a LocalLedger .sqlite file (must exist) or a ledger .json config (default "
                                     "$CLINFED_LEDGER); with --site-config, that file with the configuration's identity")
    ledger_options.add_argument("--site-config", type=Path, metavar="FILE",
                                help="your local/clinfed_site.json: its 'ledger' section is your ledger and identity")
    ledger_options.add_argument("--json", action="store_true", help="machine-readable output")

    consent = sub.add_parser("consent", help="patient consents on the ledger").add_subparsers(
        dest="consent_command", required=True)
    sync = consent.add_parser("sync", parents=[ledger_options],
                              help="publish a site's FHIR Consents (pseudonym, status, Consent hash) to the ledger")
    sync.add_argument("site_dir", type=Path, metavar="SITE_DIR")
    sync.add_argument("--site", help="the site's name in the consortium (default: SITE_DIR's folder name)")
    sync.add_argument("--study", default=STUDY_ID)
    sync.add_argument("--secret-file", type=Path, help="site pseudonymisation key (default SITE_DIR/site_secret.key)")
    sync.set_defaults(func=cmd_consent_sync)

    keys = sub.add_parser("keys", help="the site's secure-masking key").add_subparsers(
        dest="keys_command", required=True)
    register = keys.add_parser("register", parents=[ledger_options],
                               help="create the site's X25519 masking key at the site if missing and publish its "
                                    "public half on the ledger as the site (a new key applies from the next job)")
    register.add_argument("--site", required=True, help="the site's name in the consortium")
    register.add_argument("--key-file", type=Path,
                          help="the private key file, created mode 0600 if missing (default: the site's "
                               "masking_key_file from --site-config)")
    register.set_defaults(func=cmd_keys_register)

    audit = sub.add_parser("audit", help="read the audit ledger").add_subparsers(dest="audit_command", required=True)
    audit_options = argparse.ArgumentParser(add_help=False, parents=[ledger_options])
    audit_options.add_argument("--as", dest="participant", metavar="PARTICIPANT",
                               help="whose identity reads the ledger: your site's name, or coordinator; must be the "
                                    "identity of --site-config (default: that one; with --ledger alone: coordinator)")
    contributions = audit.add_parser("contributions", parents=[audit_options],
                                     help="each site's recorded update per round of a job")
    contributions.add_argument("--job", required=True)
    contributions.set_defaults(func=cmd_audit_contributions)
    models = audit.add_parser("models", parents=[audit_options],
                              help="the global model of each round of a job, its participants and absences")
    models.add_argument("--job", required=True)
    models.set_defaults(func=cmd_audit_models)
    consents = audit.add_parser("consents", parents=[audit_options], help="consents recorded for a study")
    consents.add_argument("--study", default=STUDY_ID)
    consents.add_argument("--site", help="only this site's patients")
    consents.add_argument("--pseudonym", help="the full history of one of your site's patients' consent")
    consents.add_argument("--counts", action="store_true", help="active and revoked consents per site")
    consents.set_defaults(func=cmd_audit_consents)
    verify = audit.add_parser("verify", parents=[audit_options],
                              help="check a job's chain is complete and a model file is a recorded global model")
    verify.add_argument("--job", required=True)
    verify.add_argument("--model", type=Path, metavar="FILE", help="global model file as the server saved it")
    verify.add_argument("--round", type=int, help="the round the model file should be (default: the one it matches)")
    verify.set_defaults(func=cmd_audit_verify)
    watch = audit.add_parser("watch", parents=[audit_options], help="print ledger events as they are committed")
    watch.add_argument("--from-block", type=int, help="start at this block (default: the next one; 0: all history)")
    watch.add_argument("--timeout", type=float, help="stop after this many seconds without an event")
    watch.add_argument("--no-follow", action="store_true", help="print what is there and stop")
    watch.set_defaults(func=cmd_audit_watch)

    serve = audit.add_parser("serve", parents=[audit_options],
                             help="a read-only local web page over the ledger, as your site: jobs and rounds, your "
                                  "contributions and privacy spend, consents, verification, model files; live")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    serve.add_argument("--study", default=STUDY_ID, help="the study whose consents the page shows first")
    serve.set_defaults(func=cmd_audit_serve)

    evaluation = sub.add_parser("eval", help="audits of trained models").add_subparsers(
        dest="eval_command", required=True)
    privacy = evaluation.add_parser(
        "privacy", help="membership inference (loss threshold, LiRA) against federations trained the way the job "
                        "trains, or against a given global model (--model)")
    privacy.add_argument("--data", type=Path, required=True, help="folder of site folders (`clinfed data synth`)")
    privacy.add_argument("--site", default="site-1", help="whose patients are judged (or 'all': each site's, pooled)")
    privacy.add_argument("--model", type=Path, help="attack this global model (FL_global_model.pt); members are the "
                                                    "site's training split, non-members its validation split")
    privacy.add_argument("--models", type=_positive, default=8, help="federations to train (targets and shadows)")
    privacy.add_argument("--rounds", type=_positive, default=2)
    privacy.add_argument("--local-epochs", type=_positive, default=16)
    privacy.add_argument("--batch-size", type=_positive, default=2)
    privacy.add_argument("--lr", type=float, default=1e-2)
    privacy.add_argument("--roi", type=_shape, default=(16, 16, 16), help="model input size X,Y,Z (multiples of 16)")
    privacy.add_argument("--dp-epsilon", type=float, help="train every site with DP-SGD at this epsilon (default: none)")
    privacy.add_argument("--dp-delta", type=float, default=1e-5)
    privacy.add_argument("--study", default=STUDY_ID)
    privacy.add_argument("--seed", type=int, default=0)
    privacy.add_argument("--json", action="store_true")
    privacy.set_defaults(func=cmd_eval_privacy)

    jobs = sub.add_parser("jobs", help="FLARE job folders").add_subparsers(dest="jobs_command", required=True)
    export = jobs.add_parser("export", help="export the Python job definitions into job folders")
    export.add_argument("--jobs-dir", type=Path, default=Path("jobs"))
    export.set_defaults(func=cmd_jobs_export)
    job_check = jobs.add_parser("check", help="check job folders before submitting them: meta.json, app configs, "
                                              "component classes and their arguments")
    job_check.add_argument("job_dirs", type=Path, nargs="+", metavar="JOB_DIR")
    job_check.add_argument("--json", action="store_true")
    job_check.set_defaults(func=cmd_jobs_check)

    add_consortium_commands(sub)
    return parser


# Errors a user causes (a bad file, a missing folder, a refused input): one line, no traceback.
USER_ERRORS = (ClinfedError, FhirInputError, OSError)


def user_error_message(err: BaseException) -> str:
    """One line naming the file: OSError carries the file name apart from its message."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"clinfed: error: {user_error_message(err)}", file=sys.stderr)
        return 2
    except sqlite3.DatabaseError as err:  # a damaged file given as a ledger
        source = getattr(args, "ledger", None) or getattr(args, "site_config", None) or "the ledger"
        print(f"clinfed: error: {source}: not a readable ledger ({err})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clinfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
