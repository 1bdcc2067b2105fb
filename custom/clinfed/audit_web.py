"""``clinfed audit serve``: a read-only local web page over the audit ledger, for one participant.

The page reads the ledger with the participant's own identity (its site configuration's ledger
section), so it shows exactly what the contract lets that participant read: the jobs with each
round's global model hash, participants and absences; the site's own contributions with the
epsilon spent per unit of protection; the study's consent counts per site and the site's own
consents by pseudonym (other sites' consents are commitments only, and the page shows none of
them); the verification of each job. A model file dropped on a job's page is hashed in the
browser (Web Crypto) and checked against the job's recorded global models; the file never
leaves the browser.

Built on aiohttp's web framework: FLARE already requires aiohttp, so the view adds no package;
it brings its own production HTTP server (no separate ASGI server, no development-server caveat)
and streams responses natively, which live updates (server-sent events) need.

Read-only by construction: every route is a GET (aiohttp answers other methods with 405), the
ledger is opened without an outbox and only its queries are called. It binds to 127.0.0.1
unless told otherwise, and answers only requests addressed to the host it serves (a web page
elsewhere cannot reach it through DNS rebinding). Live updates: one thread follows the ledger's
events and tells each open page which kind of record changed (and in which job or study), never
the record; the page then reads again through the queries.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import asdict
from typing import Callable

from aiohttp import web

from clinfed import audit
from clinfed.errors import ClinfedError
from clinfed.ledger import ContractLedger, LedgerError, LedgerTampered, verify_job
from clinfed.ledger.settings import LedgerSettings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
TRAINING_EVENTS = ("ContributionRecorded", "GlobalModelRecorded", "AbsenceRecorded")
HEARTBEAT_SECONDS = 15.0
# A chain check that fails is made once more after this pause before the page reports it: the
# participant's other clients (its FLARE client, ``consent sync``) share its last-seen-head file,
# and a write of theirs landing between this client's read of the chain and of that file reads
# as a truncated chain once. A real truncation or edit fails again.
RECHECK_SECONDS = 0.5
# Events say what changed, never the record: these fields of their payload may reach the page.
EVENT_FIELDS = ("job_id", "study")


class AuditView:
    """The ledger as one participant reads it, shared by the request handlers and the event
    follower (one client: its lock serialises their reads)."""

    def __init__(self, settings: LedgerSettings, ledger: ContractLedger, study: str):
        self.settings = settings
        self.ledger = ledger
        self.study = study
        self.participant = settings.participant
        self.site = self.participant if self.participant in ledger.consortium().sites else None
        self.jobs: list[str] = []  # in the order their first record was committed
        self.last_block = -1
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="clinfed-audit-events", daemon=True)
        self.follow_error: str | None = None

    # ------------------------------------------------------------------ ledger events

    def start(self, timeout: float = 60.0) -> None:
        """Follow the ledger's events from block 0 on; returns once the history is read."""
        self._follower.start()
        if not self._caught_up.wait(timeout) and self.follow_error is None:
            raise ClinfedError(f"{self.settings.describe()}: reading the ledger's history took over {timeout:.0f} s")
        if self.follow_error is not None:
            raise ClinfedError(self.follow_error)

    def stop(self) -> None:
        self._stop.set()
        self._follower.join(timeout=5)

    def _follow(self) -> None:
        rechecked = False
        try:
            while not self._stop.is_set():
                try:
                    # A timeout hands control back now and then, so the thread can stop.
                    for event in self.ledger.events(self.last_block + 1, follow=True, timeout=1.0):
                        self._note(event)
                        if self._stop.is_set():
                            return
                    self._caught_up.set()
                    rechecked = False
                except LedgerTampered:
                    if rechecked:
                        raise
                    rechecked = True
                    time.sleep(RECHECK_SECONDS)
        except LedgerError as err:  # shown on every page from now on
            self.follow_error = f"the ledger can no longer be read: {err}"
            self._caught_up.set()
            self._publish({"event": "LedgerError"})

    def _note(self, event) -> None:
        job_id = event.payload.get("job_id") if event.name in TRAINING_EVENTS else None
        with self._lock:
            self.last_block = event.block
            if job_id and job_id not in self.jobs:
                self.jobs.append(job_id)
        if self._caught_up.is_set():
            self._publish({"event": event.name, "block": event.block,
                           **{k: event.payload[k] for k in EVENT_FIELDS if k in event.payload}})

    def _publish(self, message: dict) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            loop.call_soon_threadsafe(queue.put_nowait, message)

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers.add((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = {s for s in self._subscribers if s[1] is not queue}

    # ------------------------------------------------------------------ what the pages show

    def knows(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self.jobs

    def job_list(self) -> list[dict]:
        with self._lock:
            jobs = list(self.jobs)
        return [{"job_id": job_id, "verification": verify_job(self.ledger, job_id)} for job_id in jobs]

    def job(self, job_id: str) -> dict:
        return {"job_id": job_id, "rounds": audit.models(self.ledger, job_id),
                "verification": verify_job(self.ledger, job_id)}

    def contributions(self) -> list[dict]:
        if self.site is None:
            return []
        return [asdict(c) for c in self.ledger.contributions_by_site(self.site)]

    def consents(self, study: str) -> dict:
        counts = audit.consent_counts(self.ledger, study)
        own = audit.consents(self.ledger, study, site=self.site) if self.site else []
        return {"study": study, "counts": counts, "own": own}

    def verify_model(self, job_id: str, model_sha256: str) -> dict:
        result = verify_job(self.ledger, job_id, model_sha256)
        return {**result.to_dict(), "model_sha256": model_sha256, "matched_rounds": list(result.matched_rounds)}


# --------------------------------------------------------------------------- the web application


def _templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("clinfed", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["short"] = lambda digest: digest[:16] if digest else "-"
    env.filters["eps"] = lambda value: "-" if value is None else f"{value:.3g}"
    env.filters["when"] = lambda stamp: "-" if not stamp else stamp[:19].replace("T", " ") + "Z"
    return env


VIEW = web.AppKey("view", AuditView)
HOSTS = web.AppKey("hosts", set)
TEMPLATES = web.AppKey("templates", object)


def _page(request: web.Request, template: str, status: int = 200, **context) -> web.Response:
    view = request.app[VIEW]
    html = request.app[TEMPLATES].get_template(template).render(
        view=view, identity=view.settings.describe(), error=view.follow_error, path=request.path, **context)
    return web.Response(text=html, content_type="text/html", status=status)


async def _read(function: Callable, *args):
    """A ledger query, off the event loop (the ledger client blocks); a failed chain check is
    made once more (see ``RECHECK_SECONDS``)."""
    try:
        return await asyncio.to_thread(function, *args)
    except LedgerTampered:
        await asyncio.sleep(RECHECK_SECONDS)
        return await asyncio.to_thread(function, *args)


async def jobs_page(request: web.Request) -> web.Response:
    return _page(request, "audit_jobs.html", jobs=await _read(request.app[VIEW].job_list))


async def job_page(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    view = request.app[VIEW]
    if not view.knows(job_id):
        return _page(request, "audit_error.html", status=404, message=f"no job {job_id} on this ledger")
    return _page(request, "audit_job.html", job=await _read(view.job, job_id))


async def contributions_page(request: web.Request) -> web.Response:
    return _page(request, "audit_contributions.html", contributions=await _read(request.app[VIEW].contributions))


async def consents_page(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    study = request.query.get("study", view.study)
    return _page(request, "audit_consents.html", consents=await _read(view.consents, study))


async def verify_api(request: web.Request) -> web.Response:
    job_id, digest = request.query.get("job", ""), request.query.get("sha256", "").lower()
    if not _SHA256.match(digest):
        return web.json_response({"error": "sha256 must be 64 hex digits"}, status=400)
    view = request.app[VIEW]
    if not view.knows(job_id):
        return web.json_response({"error": f"no job {job_id} on this ledger"}, status=404)
    return web.json_response(await _read(view.verify_model, job_id, digest))


async def events_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``data:`` line per ledger event, saying what changed."""
    view = request.app[VIEW]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    queue = view.subscribe()
    try:
        await response.write(b": connected\n\n")
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                await response.write(f"data: {json.dumps(message, sort_keys=True)}\n\n".encode("utf-8"))
            except asyncio.TimeoutError:
                await response.write(b": heartbeat\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        view.unsubscribe(queue)
    return response


async def script(request: web.Request) -> web.Response:
    text = request.app[TEMPLATES].loader.get_source(request.app[TEMPLATES], "audit.js")[0]
    return web.Response(text=text, content_type="text/javascript")


@web.middleware
async def guard(request: web.Request, handler):
    """Only requests addressed to this server; ledger errors as a page; strict headers."""
    if request.host.lower() not in request.app[HOSTS]:
        return web.Response(status=421, text=f"this audit view answers for {sorted(request.app[HOSTS])[0]} only")
    try:
        response = await handler(request)
    except LedgerError as err:
        response = _page(request, "audit_error.html", status=500, message=f"the ledger cannot be read: {err}")
    response.headers["Content-Security-Policy"] = ("default-src 'none'; script-src 'self'; connect-src 'self'; "
                                                   "style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                                                   "form-action 'self'; frame-ancestors 'none'")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def build_app(view: AuditView, host: str, port: int) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[VIEW] = view
    app[TEMPLATES] = _templates()
    names = {host, "localhost", "127.0.0.1", "[::1]"} if host in ("127.0.0.1", "localhost", "::1") else {host}
    app[HOSTS] = {f"{name}:{port}".lower() for name in names}
    app.add_routes([web.get("/", jobs_page), web.get("/jobs/{job_id}", job_page),
                    web.get("/contributions", contributions_page), web.get("/consents", consents_page),
                    web.get("/api/verify", verify_api), web.get("/events", events_stream),
                    web.get("/audit.js", script)])
    return app


def serve(settings: LedgerSettings, study: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          on_ready: Callable[[str], None] = print) -> None:
    """Serve the view until interrupted; ``on_ready`` gets the page's URL once it listens."""
    import socket

    # The port is bound before the app is built: the Host check needs the real port (port 0: any free one).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ClinfedError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    port = sock.getsockname()[1]
    with settings.open(outbox=False) as ledger:
        view = AuditView(settings, ledger, study)
        view.start()
        try:
            asyncio.run(_run(build_app(view, host, port), sock, f"http://{_url_host(host)}:{port}/", on_ready))
        finally:
            view.stop()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _run(app: web.Application, sock, url: str, on_ready: Callable[[str], None]) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        on_ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
