"""A local trial consortium on one machine: ``up`` starts the FLARE server and every site from their
startup kits as separate processes, ``down`` stops them, ``status`` reports processes, connected
sites and jobs, and digs the cause of a failed job out of the participants' logs.

Each participant runs its kit's ``startup/sub_start.sh --once`` (the kit's own start command without
its restart loop), in its own process group, with this interpreter's ``bin`` first on ``PATH``
(FLARE's scripts run a bare ``python3``). Process IDs are kept in ``DIR/run/processes.json``;
``down`` ends only those processes and their descendants.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clinfed.errors import ClinfedError

from . import namespaces
from .provision import load_state, tool_env

RUN_DIR = "run"
PROCESS_FILE = "processes.json"
FAILED_STATUSES = ("FINISHED:ABNORMAL", "FINISHED:EXECUTION_EXCEPTION", "FINISHED:FAILED_TO_RUN",
                   "FINISHED:ABORTED", "FAILED_TO_RUN")
# What a failed job's logs say, most telling first: (kind, regex, one-line explanation).
FAILURE_PATTERNS = [
    # FLARE's own one-line report of a component it could not build fails for a component with
    # built components in its arguments (a workflow's aggregator); our error is still in the traceback.
    ("job_argument", re.compile(r"clinfed\.errors\.ArgumentError: [^\n]*"),
     "a component of the job refused an argument from the job's config (fix the job folder and submit again)"),
    ("allow_list", re.compile(r"ComponentNotAuthorized[^\n]*|[^\n]*is not in allow_list[^\n]*"),
     "a component of the job is not on this participant's class allow-list (local/resources.json)"),
    ("privacy_scope", re.compile(r"[^\n]*privacy scope '[^']*' is not allowed[^\n]*"),
     "the job names a privacy scope this site does not define (local/privacy.json)"),
    ("byoc", re.compile(r"[^\n]*(?:byoc|BYOC)[^\n]*not authorized[^\n]*|[^\n]*not authorized for 'byoc'[^\n]*"),
     "the job carries custom code (app/custom) and BYOC is refused"),
    ("privacy_budget", re.compile(r"[^\n]*(?:PrivacyBudgetExceeded|declines the update|declining the train task)[^\n]*"),
     "the site's privacy budget for the study is spent: it declines to release more updates"),
    ("secagg_refused", re.compile(r"[^\n]*(?:secagg_setup|secagg_unmask|train): refused: [^\n]*"),
     "the site refused a secure-aggregation step (the reason is named)"),
    ("privacy_refused", re.compile(r"[^\n]*strict privacy scope[^\n]*"),
     "the site's privacy policy refused to release an update"),
    ("filter_error", re.compile(r"[^\n]*Processing error in Task Result Filter[^\n]*"),
     "a task result filter failed at the site"),
    ("config", re.compile(r"[^\n]*ConfigError[^\n]*"), "a participant's configuration is incomplete"),
    ("execution_exception", re.compile(r"[^\n]*EXECUTION_EXCEPTION[^\n]*"),
     "a task raised at a site (traceback below)"),
]


# FLARE's error for a job component it cannot build (an unknown class, an argument its __init__ refuses).
_JOB_CONFIG_ERROR = re.compile(r"Error processing '(?P<file>[^']+)' in element '(?P<element>.*?)': "
                               r"path: '(?P<path>[^']*)', exception: '(?P<error>.*)'$", re.MULTILINE)
# FLARE's log context ("[identity=site-1, run=..., task_id=...] - "): noise in a one-line cause.
_CONTEXT = re.compile(r"\[identity=[^\]]*\] - ")


class TrialError(ClinfedError):
    """The trial consortium could not be started, stopped or read."""


# --------------------------------------------------------------------------- processes


def _run_dir(out: Path) -> Path:
    return Path(out) / RUN_DIR


def _process_file(out: Path) -> Path:
    return _run_dir(out) / PROCESS_FILE


def _alive(pid: int) -> bool:
    try:
        import psutil

        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - no such process
        return False


def recorded_processes(out: str | Path) -> dict[str, int]:
    path = _process_file(Path(out))
    if not path.is_file():
        return {}
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


def start_participant(out: Path, kit: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """Start one participant's kit (``sub_start.sh --once``) in its own process group, on its own
    host when the trial is placed in network namespaces (:func:`up_in_namespaces`)."""
    log = _run_dir(out) / f"{name}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    for stale in ("pid.fl", "shutdown.fl", "restart.fl", "daemon_pid.fl"):
        (kit / stale).unlink(missing_ok=True)
    placement = namespaces.load(_run_dir(out))
    host = placement.command_prefix(name) if placement is not None else []
    with open(log, "ab") as handle:
        return subprocess.Popen([*host, "bash", str(kit / "startup" / "sub_start.sh"), "--once"], cwd=kit,
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env or tool_env(), start_new_session=True)


@contextmanager
def admin_session(out: str | Path, username: str | None = None, timeout: float = 30.0):
    """A FLARE API session as an admin of the consortium (default: its first lead)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    state = load_state(out)
    username = username or state["leads"][0]
    kit = state["kits"].get(username)
    if kit is None:
        raise TrialError(f"{username!r} is not an admin of consortium {state['consortium']}")
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):  # FLARE prints "Connecting to FLARE ..." to stdout
        session = new_secure_session(username, kit, timeout=timeout)
    try:
        yield session
    finally:
        session.close()


def connected_sites(session) -> list[str]:
    info = session.get_system_info()
    return sorted(c.name for c in info.client_info)


def wait_for_sites(out: str | Path, sites: list[str], timeout: float = 120.0, username: str | None = None) -> float:
    """Wait until every site in ``sites`` is connected to the server; returns the seconds waited."""
    started = time.monotonic()
    last_error = None
    while time.monotonic() - started < timeout:
        try:
            with admin_session(out, username, timeout=min(30.0, timeout)) as session:
                while time.monotonic() - started < timeout:
                    connected = connected_sites(session)
                    if set(sites) <= set(connected):
                        return time.monotonic() - started
                    time.sleep(1.0)
        except Exception as exc:  # noqa: BLE001 - the server may not accept logins yet
            last_error = exc
            time.sleep(1.0)
    raise TrialError(f"after {timeout:.0f} s not all of {sites} were connected to the server"
                     + (f" (last error: {last_error})" if last_error else ""))


@dataclass
class UpResult:
    processes: dict[str, int]
    seconds_to_connected: float
    sites: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"processes": self.processes, "seconds_to_connected": round(self.seconds_to_connected, 1),
                "sites": self.sites}


def up(out: str | Path, sites: list[str] | None = None, timeout: float = 180.0, log=lambda m: None) -> UpResult:
    """Start the server and the sites (default all) from their kits; wait until they are connected."""
    out = Path(out).resolve()
    state = load_state(out)
    sites = list(sites) if sites else list(state["sites"])
    unknown = sorted(set(sites) - set(state["sites"]))
    if unknown:
        raise TrialError(f"not sites of this consortium: {', '.join(unknown)}")
    running = {k: v for k, v in recorded_processes(out).items() if _alive(v)}
    started_at = time.monotonic()
    env = tool_env()
    for name in [state["server"], *sites]:
        if name in running:
            log(f"{name} already runs (pid {running[name]})")
            continue
        proc = start_participant(out, Path(state["kits"][name]), name,
                                 {**env, **state.get("server_env", {})} if name == state["server"] else env)
        running[name] = proc.pid
        log(f"started {name} (pid {proc.pid})")
        _process_file(out).write_text(json.dumps(running, indent=2))
        if name == state["server"]:
            time.sleep(2.0)  # let the server bind its port before the sites dial it
    try:
        wait_for_sites(out, sites, timeout=timeout)
    except TrialError:
        for name, pid in running.items():
            if not _alive(pid):
                raise TrialError(f"{name} exited; see {_run_dir(out) / (name + '.out')} and its log.txt") from None
        raise
    seconds = time.monotonic() - started_at
    log(f"{len(sites)} site(s) connected after {seconds:.1f} s")
    return UpResult(running, seconds, sites)


def up_in_namespaces(out: str | Path, sites: list[str] | None = None, timeout: float = 180.0,
                     log=lambda m: None) -> UpResult:
    """:func:`up`, with the server and every site on a host of its own: a Linux network namespace
    with its own address (:mod:`clinfed.consortium.namespaces`), the stand-in for hospitals on
    separate hosts. The namespaces are made on the first call and kept (a site started later goes
    to its own) until :func:`remove_namespaces`."""
    out = Path(out).resolve()
    state = load_state(out)
    if namespaces.load(_run_dir(out)) is None:
        running = [n for n, pid in recorded_processes(out).items() if _alive(pid)]
        if running:
            raise TrialError(f"{', '.join(running)} already run on this machine's own network; "
                             f"`clinfed consortium down {out}` first")
        placement = namespaces.plan(state["server"], state["host"], list(state["sites"]))
        namespaces.create(placement)
        namespaces.save(placement, _run_dir(out))
        log(f"network namespaces on {placement.subnet}.0/24 (bridge {placement.bridge}): "
            + ", ".join(f"{n} {h['address']}" for n, h in placement.hosts.items()))
    return up(out, sites=sites, timeout=timeout, log=log)


def remove_namespaces(out: str | Path, log=lambda m: None) -> bool:
    """Remove a trial's network namespaces once none of its participants runs; False if it had none."""
    out = Path(out).resolve()
    placement = namespaces.load(_run_dir(out))
    if placement is None:
        return False
    running = [n for n, pid in recorded_processes(out).items() if _alive(pid)]
    if running:
        raise TrialError(f"{', '.join(running)} still run in the trial's namespaces; stop them first")
    namespaces.destroy(placement)
    namespaces.forget(_run_dir(out))
    log(f"removed the network namespaces on {placement.subnet}.0/24")
    return True


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - gone already
        return []


def stop_participant(pid: int, grace: float = 10.0) -> None:
    """End a participant we started: SIGTERM to its process group and its descendants, SIGKILL
    whatever is left after ``grace`` seconds."""
    targets = [pid, *_descendants(pid)]
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    for child in targets[1:]:
        try:
            os.kill(child, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in targets):
        time.sleep(0.3)
    for p in targets:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def down(out: str | Path, names: list[str] | None = None, log=lambda m: None) -> list[str]:
    """Stop the participants ``up`` started (default all; sites first, then the server)."""
    out = Path(out).resolve()
    state = load_state(out)
    running = recorded_processes(out)
    names = list(names) if names else [n for n in running if n != state["server"]] + (
        [state["server"]] if state["server"] in running else [])
    for name in names:
        pid = running.pop(name, None)
        if pid is None:
            continue
        if _alive(pid):
            stop_participant(pid)
            log(f"stopped {name} (pid {pid})")
    _process_file(out).parent.mkdir(parents=True, exist_ok=True)
    _process_file(out).write_text(json.dumps(running, indent=2))
    return names


# --------------------------------------------------------------------------- status


def _job_meta(storage: Path) -> list[dict]:
    jobs = []
    root = storage / "jobs-storage"
    if not root.is_dir():
        return jobs
    for folder in root.iterdir():
        meta_file = folder / "meta"
        if not meta_file.is_file():
            continue
        try:
            meta = json.loads(meta_file.read_bytes())
        except (OSError, ValueError) as err:  # listed, not dropped: the store itself is damaged
            meta = {"job_id": folder.name, "status": f"UNKNOWN (unreadable {meta_file}: {err})"}
        jobs.append(meta)
    return sorted(jobs, key=lambda m: m.get("submit_time", 0))


def _job_logs(state: dict, name: str, job_id: str) -> list[tuple[str, str]]:
    """(where, text) of every log a participant kept of a job. A site keeps its run folder in its
    kit; the server's run folder lives only while the job runs, then FLARE zips it into the job
    store (``<server_storage>/jobs-storage/<job id>/workspace``): both are read."""
    kit = Path(state["kits"][name])
    found: list[tuple[str, str]] = []
    job_dir = kit / job_id
    if job_dir.is_dir():
        found += [(str(f), f.read_text(errors="replace")) for f in sorted(job_dir.rglob("log*.txt")) if f.is_file()]
    if name == state["server"]:
        archive = Path(state["server_storage"]) / "jobs-storage" / job_id / "workspace"
        if archive.is_file() and zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                found += [(f"{archive}!{member}", zipped.read(member).decode(errors="replace"))
                          for member in zipped.namelist() if Path(member).name == "log.txt"]
    parent = kit / "log.txt"
    if parent.is_file():  # the parent process's log: only the lines about this job
        found.append((str(parent), "\n".join(line for line in parent.read_text(errors="replace").splitlines()
                                               if job_id in line)))
    return found


def _job_config_refusal(text: str) -> dict | None:
    """FLARE's error for a component it could not build from the job's config: which file, which
    component (config path and class) and the error, as one line."""
    match = _JOB_CONFIG_ERROR.search(text)
    if match is None:
        return None
    try:
        component = json.loads(match.group("element")).get("path", "?")
    except (ValueError, AttributeError):
        component = "?"
    line = (f"{Path(match.group('file')).name} {match.group('path')} ({component}): "
            f"{match.group('error')}")
    return {"kind": "job_config", "explanation": "the job's configuration was refused when FLARE built its "
                                                 "components (fix the job folder and submit again)",
            "evidence": [line]}


def failure_causes(state: dict, job_id: str, deploy_detail=None, max_lines: int = 3) -> list[dict]:
    """Why a job failed, read from the participants' logs (the lead cannot read them through FLARE
    by default): job configs FLARE could not build, allow-list refusals, privacy scope refusals,
    filter refusals, tracebacks. One cause per participant: the most telling one found (see
    ``FAILURE_PATTERNS``)."""
    causes: list[dict] = []
    details = deploy_detail if isinstance(deploy_detail, list) else ([deploy_detail] if deploy_detail else [])
    for detail in details:
        text = str(detail)
        for kind, pattern, why in FAILURE_PATTERNS:
            if pattern.search(text):
                causes.append({"participant": text.split(":", 1)[0].strip(), "kind": kind, "explanation": why,
                               "evidence": [text.strip()], "log": "job_deploy_detail"})
                break
    if causes:  # the deploy detail names each refusing site and why; the logs only repeat it
        return causes
    for name in [state["server"], *state["sites"]]:
        texts = _job_logs(state, name, job_id)
        cause = None
        for log_file, text in texts:
            cause = _job_config_refusal(text)
            if cause:
                cause.update(participant=name, log=log_file)
                break
        for kind, pattern, why in [] if cause else FAILURE_PATTERNS:
            for log_file, text in texts:
                found = list(dict.fromkeys(_CONTEXT.sub("", m.group(0)).strip() for m in pattern.finditer(text)))
                # Log lines before quoted source lines of a traceback ("raise X(f'...')").
                found = sorted(found, key=lambda line: (not re.match(r"\d{4}-\d\d-\d\d ", line),
                                                        bool(re.search(r"\(f?[\"']|^raise ", line))))
                if found:
                    cause = {"participant": name, "kind": kind, "explanation": why, "evidence": found[:max_lines],
                             "log": str(log_file)}
                    traceback = _last_traceback(text)
                    if traceback:
                        cause["traceback"] = traceback
                    break
            if cause:
                break
        if cause is None:
            for log_file, text in texts:
                traceback = _last_traceback(text)
                if traceback:
                    cause = {"participant": name, "kind": "traceback", "explanation": "an error at this participant",
                             "evidence": traceback.splitlines()[-1:], "traceback": traceback, "log": str(log_file)}
                    break
        if cause:
            causes.append(cause)
    return causes


def _last_traceback(text: str, max_lines: int = 25) -> str | None:
    start = text.rfind("Traceback (most recent call last)")
    if start < 0:
        return None
    lines = text[start:].splitlines()
    block = [lines[0]]
    for line in lines[1:]:
        block.append(line)
        if line and not line.startswith((" ", "\t", "Traceback")) and not line.startswith("During handling"):
            break
    return "\n".join(block[-max_lines:])


def status(out: str | Path, query_server: bool = True) -> dict:
    """Processes, connected sites, jobs (with causes of failures) of a trial consortium."""
    out = Path(out).resolve()
    state = load_state(out)
    running = recorded_processes(out)
    processes = {name: {"pid": running.get(name), "running": bool(running.get(name)) and _alive(running[name])}
                 for name in [state["server"], *state["sites"]]}
    report: dict = {"consortium": state["consortium"], "out": str(out), "server": f"{state['host']}:{state['port']}",
                    "processes": processes, "connected_sites": None, "jobs": []}
    if query_server and processes[state["server"]]["running"]:
        try:
            with admin_session(out, timeout=10.0) as session:
                report["connected_sites"] = connected_sites(session)
        except Exception as exc:  # noqa: BLE001 - report, do not fail
            report["server_error"] = str(exc)
    for meta in _job_meta(Path(state["server_storage"])):
        job_id = meta.get("job_id", "?")
        job = {"job_id": job_id, "name": meta.get("name"), "status": meta.get("status"),
               "submitter": meta.get("submitter_name"), "scope": meta.get("scope"),
               "submit_time": meta.get("submit_time_iso"), "duration": meta.get("duration")}
        if meta.get("job_deploy_detail"):
            job["deploy_detail"] = meta["job_deploy_detail"]
        if job["status"] in ("RUNNING", "DISPATCHED") and not processes[state["server"]]["running"]:
            job["status"] = f"{job['status']} (as last recorded; the server is not running)"
        if str(meta.get("status", "")).upper() in FAILED_STATUSES or "ABNORMAL" in str(meta.get("status", "")) \
                or "EXCEPTION" in str(meta.get("status", "")):
            job["causes"] = failure_causes(state, job_id, meta.get("job_deploy_detail"))
            if not job["causes"]:
                job["no_cause_found"] = (f"no error in the logs of {', '.join([state['server'], *state['sites']])} "
                                         f"for this job (a participant's logs may be elsewhere, or gone)")
        report["jobs"].append(job)
    return report


def status_text(report: dict) -> str:
    lines = [f"consortium {report['consortium']} ({report['out']}), server {report['server']}"]
    for name, p in report["processes"].items():
        lines.append(f"  {name:<12} {'running' if p['running'] else 'stopped'}"
                     + (f" (pid {p['pid']})" if p["running"] else ""))
    if report.get("connected_sites") is not None:
        lines.append(f"  connected sites: {', '.join(report['connected_sites']) or 'none'}")
    if report.get("server_error"):
        lines.append(f"  server not answering: {report['server_error']}")
    if not report["jobs"]:
        lines.append("no jobs")
    for job in report["jobs"]:
        lines.append(f"job {job['job_id']}  {job.get('name')}  {job.get('status')}  submitted by "
                     f"{job.get('submitter')} at {job.get('submit_time')}")
        if job.get("deploy_detail") and not job.get("causes"):
            lines.append(f"    deploy: {job['deploy_detail']}")
        if job.get("no_cause_found"):
            lines.append(f"    cause: {job['no_cause_found']}")
        for cause in job.get("causes", []):
            lines.append(f"    cause at {cause['participant']}: {cause['explanation']}")
            for evidence in cause["evidence"][:3]:
                lines.append(f"      {evidence[:400]}")
            if cause.get("traceback") and cause["kind"] in ("execution_exception", "traceback", "config"):
                lines.append("      " + cause["traceback"].replace("\n", "\n      "))
            lines.append(f"      (from {cause['log']})")
    return "\n".join(lines)
