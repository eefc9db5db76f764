"""Routes, templates and the guards of the dashboard (a Starlette app).

Two modes, chosen by where it listens (serve.py):
- loopback: the pages act as the user whose profile/token started the dashboard; no login.
  A Host check (against DNS rebinding) and a per-process CSRF token on every form keep
  other web pages the browser has open from reading or acting through it.
- remote (TLS only): every browser logs in with its balsam user name and password; the
  dashboard asks the server for a token (AuthService.Login) and acts with that user's
  token for that browser session only, so each viewer sees exactly what the API lets
  them see.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from balsam_grpc.dashboard.live import Relay, valid_cursor
from balsam_grpc.dashboard.reads import RETRY_AVAILABLE, Reader
from balsam_grpc.dashboard.views import (
    BATCH_JOB_STATES,
    BATCH_JOB_STYLE,
    JOB_STATES,
    PAGE_SIZES,
    STATE_STYLE,
    TRANSFER_STATES,
    TRANSFER_STYLE,
    WINDOWS,
    BadQuery,
    JobQuery,
    parse_job_query,
    parse_window,
)
from balsam_grpc.sdk.client import Client
from balsam_grpc.sdk.convert import enum_number
from balsam_grpc.sdk.errors import BalsamError, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from balsam_grpc.v1 import batch_job_pb2, transfer_item_pb2

log = structlog.get_logger("balsam.dashboard")

HERE = Path(__file__).parent
SESSION_COOKIE = "balsam_dashboard"
SESSION_TTL_SECONDS = 12 * 3600
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
SECURITY_HEADERS = {
    # Scripts and styles come from the package only (the chart library is vendored).
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


@dataclass
class Viewer:
    """Who a request acts as: a reader with their token, and the CSRF token of their forms."""

    reader: Reader
    username: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    expires: float = float("inf")
    token_id: str = ""


@dataclass
class DashboardConfig:
    login_required: bool
    make_client: Callable[[str | None], Client]   # token (None: the profile's) -> client
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_HOSTS))
    secure_cookies: bool = False


class Viewers:
    """The loopback mode's one viewer, or the remote mode's logged-in sessions."""

    def __init__(self, config: DashboardConfig) -> None:
        self.config = config
        self._sessions: dict[str, Viewer] = {}
        self._lock = threading.Lock()
        self._local: Viewer | None = None
        if not config.login_required:
            client = config.make_client(None)
            user = client.whoami().user.username
            self._local = Viewer(Reader(client), user)

    def of(self, request: Request) -> Viewer | None:
        if self._local is not None:
            return self._local
        sid = request.cookies.get(SESSION_COOKIE, "")
        with self._lock:
            viewer = self._sessions.get(sid)
            if viewer is not None and viewer.expires < time.time():
                del self._sessions[sid]
                viewer = None
        return viewer

    def login(self, username: str, password: str) -> tuple[str, Viewer]:
        from balsam_grpc.v1 import auth_service_pb2

        anonymous = self.config.make_client("")
        try:
            response = anonymous.call("AuthService", "Login", auth_service_pb2.LoginRequest(
                username=username, password=password, ttl_seconds=SESSION_TTL_SECONDS))
        finally:
            anonymous.close()
        viewer = Viewer(Reader(self.config.make_client(response.token)), response.user.username,
                        expires=time.time() + SESSION_TTL_SECONDS, token_id=response.info.id)
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = viewer
        return sid, viewer

    def logout(self, request: Request) -> None:
        from balsam_grpc.v1 import auth_service_pb2

        with self._lock:
            viewer = self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        if viewer is None:
            return
        try:
            if viewer.token_id:
                viewer.reader.call("AuthService", "RevokeToken", auth_service_pb2.RevokeTokenRequest(
                    id=viewer.token_id))
        except BalsamError as err:
            log.warning("could not revoke the session's token", error=err.message)
        viewer.reader.client.close()


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["thousands"] = lambda n: f"{n:,}" if isinstance(n, int) else n
    env.filters["bytes"] = _human_bytes
    env.filters["nodes"] = lambda x: f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"
    env.globals.update(JOB_STATES=JOB_STATES, PAGE_SIZES=PAGE_SIZES, WINDOWS=WINDOWS, STATE_STYLE=STATE_STYLE,
                       BATCH_JOB_STATES=BATCH_JOB_STATES, TRANSFER_STATES=TRANSFER_STATES,
                       BATCH_JOB_STYLE=BATCH_JOB_STYLE, TRANSFER_STYLE=TRANSFER_STYLE, RETRY_AVAILABLE=RETRY_AVAILABLE)
    return env


def _human_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


Handler = Callable[[Request, Viewer], Awaitable[Response]]
MAX_FORM_BYTES = 16_384


async def small_form(request: Request) -> dict[str, str]:
    """The dashboard's own forms are a few url-encoded fields: parsed here rather than
    with a multipart library; anything else (or larger) reads as an empty form."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        return {}
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def create_app(config: DashboardConfig) -> Starlette:
    templates = _templates()
    viewers = Viewers(config)

    def page(request: Request, viewer: Viewer | None, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(
            request=request, path=request.url.path, viewer=viewer, login_required=config.login_required,
            csrf=viewer.csrf if viewer else "", **context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def error_page(request: Request, viewer: Viewer | None, status: int, title: str, message: str) -> HTMLResponse:
        return page(request, viewer, "error.html", status=status, title=title, message=message)

    def viewer_required(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            viewer = viewers.of(request)
            if viewer is None:
                if request.url.path.startswith(("/api/", "/events")) or request.headers.get("x-fragment"):
                    return JSONResponse({"error": "log in first"}, status_code=401)
                return RedirectResponse(f"/login?next={quote(str(request.url.path))}", status_code=303)
            try:
                return await handler(request, viewer)
            except BadQuery as err:
                return error_page(request, viewer, 400, "That query cannot be run", str(err))
            except NotFound as err:
                return error_page(request, viewer, 404, "Not found", err.message)
            except (Unauthenticated, PermissionDenied) as err:
                return error_page(request, viewer, 403, "Not allowed", err.message)
            except InvalidArgument as err:  # what the URL asked for (a corrupt page_token...)
                return error_page(request, viewer, 400, "That query cannot be run", err.message)
            except BalsamError as err:
                log.warning("server call failed", path=request.url.path, error=err.message, code=err.code.name)
                return error_page(request, viewer, 502, "The server refused or failed", err.message)
        return endpoint

    def same_origin(request: Request) -> bool:
        """A browser names the page a form came from; another site's page is refused."""
        origin = request.headers.get("origin")
        return not origin or origin.split("://", 1)[-1] == request.headers.get("host", "")

    def check_csrf(request: Request, viewer: Viewer, form: Any) -> bool:
        return same_origin(request) and hmac.compare_digest(str(form.get("csrf", "")), viewer.csrf)

    # ------------------------------------------------------------------ overview

    async def overview(request: Request, viewer: Viewer) -> Response:
        window, seconds = parse_window(request.query_params.get("window"))
        # The cursor before the reads, never alongside: the page's stream resumes after it,
        # so a change committed between a read and a later cursor would never reach the page.
        cursor = await run_in_threadpool(viewer.reader.cursor_now)
        data = await run_in_threadpool(viewer.reader.overview, seconds)
        return page(request, viewer, "overview.html", title="Overview", window=window, cursor=cursor, o=data)

    async def overview_live(request: Request, viewer: Viewer) -> Response:
        _, seconds = parse_window(request.query_params.get("window"))
        data = await run_in_threadpool(viewer.reader.overview, seconds)
        return page(request, viewer, "overview_live.html", o=data)

    async def analytics(request: Request, viewer: Viewer) -> Response:
        try:
            _, seconds = parse_window(request.query_params.get("window"))
        except BadQuery as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(await run_in_threadpool(viewer.reader.analytics, seconds))

    # ---------------------------------------------------------------------- jobs

    def job_query(request: Request) -> JobQuery:
        params = {key: request.query_params.getlist(key) for key in request.query_params}
        return parse_job_query(params)

    async def jobs(request: Request, viewer: Viewer) -> Response:
        query = job_query(request)
        reader = viewer.reader
        cursor = await run_in_threadpool(reader.cursor_now)  # before the reads (see overview)
        result, names = await run_in_threadpool(reader.jobs_page, query)
        return page(request, viewer, "jobs.html", title="Jobs", q=query, result=result, cursor=cursor,
                    sites=sorted(names.sites.values(), key=lambda s: s.name),
                    apps=sorted({a.name for a in names.apps.values()}))

    async def job_rows(request: Request, viewer: Viewer) -> Response:
        query = job_query(request)
        ids = [int(i) for i in request.query_params.get("ids", "").split(",") if i.isdigit() and len(i) <= 19]
        if not ids or len(ids) > 1000:
            return Response("give 1 to 1000 job ids", status_code=400)
        names = await run_in_threadpool(viewer.reader.names)
        rows = await run_in_threadpool(viewer.reader.job_rows, query, ids, names)
        return page(request, viewer, "job_rows.html", rows=rows)

    async def job_count(request: Request, viewer: Viewer) -> Response:
        try:
            query = job_query(request)
        except BadQuery as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse({"count": await run_in_threadpool(viewer.reader.count, query)})

    def job_id(request: Request) -> int:
        text = request.path_params["job_id"]
        if not (text.isascii() and text.isdigit() and len(text) <= 18):
            raise BadQuery(f"{text!r} is not a job id")
        return int(text)

    async def job(request: Request, viewer: Viewer) -> Response:
        jid = job_id(request)
        cursor = await run_in_threadpool(viewer.reader.cursor_now)
        detail = await run_in_threadpool(viewer.reader.job, jid)
        return page(request, viewer, "job.html", title=f"Job {jid}", j=detail, cursor=cursor,
                    flash=request.query_params.get("flash", "")[:200])

    async def job_live(request: Request, viewer: Viewer) -> Response:
        detail = await run_in_threadpool(viewer.reader.job, job_id(request))
        return page(request, viewer, "job_live.html", j=detail)

    async def job_kill(request: Request, viewer: Viewer) -> Response:
        jid = job_id(request)
        if request.method == "GET":
            detail = await run_in_threadpool(viewer.reader.job, jid)
            return page(request, viewer, "confirm_kill.html", title=f"Kill job {jid}?", j=detail)
        form = await small_form(request)
        if not check_csrf(request, viewer, form):
            return error_page(request, viewer, 403, "Refused", "the form was not sent from this dashboard; "
                              "open the job's page and use its Kill button")
        reason = str(form.get("reason", "")).strip()[:500] or f"killed from the dashboard by {viewer.username}"
        try:
            await run_in_threadpool(viewer.reader.kill, jid, reason)
        except BalsamError as err:
            if isinstance(err, NotFound):
                raise
            return RedirectResponse(f"/jobs/{jid}?flash={quote('not killed: ' + err.message[:150])}",
                                    status_code=303)
        return RedirectResponse(f"/jobs/{jid}?flash={quote('killed')}", status_code=303)

    async def job_retry(request: Request, viewer: Viewer) -> Response:
        jid = job_id(request)
        if not RETRY_AVAILABLE:
            return error_page(request, viewer, 501, "Retry is not offered",
                              "this dashboard's contract has no RetryJobs call; use balsamctl with a newer server")
        if request.method == "GET":
            detail = await run_in_threadpool(viewer.reader.job, jid)
            return page(request, viewer, "confirm_retry.html", title=f"Retry job {jid}?", j=detail)
        form = await small_form(request)
        if not check_csrf(request, viewer, form):
            return error_page(request, viewer, 403, "Refused", "the form was not sent from this dashboard; "
                              "open the job's page and use its Retry button")
        try:
            await run_in_threadpool(viewer.reader.retry, jid, form.get("reset_run_count") == "on")
        except BalsamError as err:
            if isinstance(err, NotFound):
                raise
            return RedirectResponse(f"/jobs/{jid}?flash={quote('not retried: ' + err.message[:150])}",
                                    status_code=303)
        return RedirectResponse(f"/jobs/{jid}?flash={quote('retried')}", status_code=303)

    # -------------------------------------------------------- batch jobs, transfers

    def states_param(request: Request, enum: Any, names: list[str]) -> tuple[list[int], list[str]]:
        chosen = [s for s in request.query_params.get("state", "").split(",") if s.strip()]
        numbers = []
        for name in chosen:
            try:
                numbers.append(enum_number(enum, name, "state"))
            except ValueError:
                raise BadQuery(f"state {name!r}: choose from {', '.join(names)}") from None
        return numbers, chosen

    async def site_param(request: Request, viewer: Viewer) -> tuple[list[int], str]:
        ref = request.query_params.get("site", "").strip()
        if not ref:
            return [], ""
        names = await run_in_threadpool(viewer.reader.names)
        ids = [s.id for s in names.sites.values() if s.name == ref or str(s.id) == ref]
        return (ids or [-1]), ref  # -1: a site the user has not got selects nothing

    async def listing(request: Request, viewer: Viewer, *, template: str, title: str, enum: Any,
                      names: list[str], read: Callable[..., Any], live_kind: str) -> Response:
        states, chosen = states_param(request, enum, names)
        fragment = request.url.path.endswith("/live")
        cursor = "" if fragment else await run_in_threadpool(viewer.reader.cursor_now)  # before the reads
        site_ids, site = await site_param(request, viewer)
        token = request.query_params.get("page_token", "")
        rows, next_token = ([], "") if site_ids == [-1] else await run_in_threadpool(read, site_ids, states, token)
        sites = [] if fragment else sorted((await run_in_threadpool(viewer.reader.names)).sites.values(),
                                           key=lambda s: s.name)
        return page(request, viewer, template if not fragment else template.replace(".html", "_live.html"),
                    title=title, rows=rows, next_token=next_token, state=",".join(chosen), site=site,
                    page_token=token, cursor=cursor, sites=sites, live_kind=live_kind)

    async def batch_jobs(request: Request, viewer: Viewer) -> Response:
        return await listing(request, viewer, template="batch_jobs.html", title="Batch jobs",
                             enum=batch_job_pb2.BatchJobState.DESCRIPTOR, names=BATCH_JOB_STATES,
                             read=viewer.reader.batch_jobs, live_kind="batch_job")

    async def transfers(request: Request, viewer: Viewer) -> Response:
        return await listing(request, viewer, template="transfers.html", title="Transfers",
                             enum=transfer_item_pb2.TransferState.DESCRIPTOR, names=TRANSFER_STATES,
                             read=viewer.reader.transfers, live_kind="transfer")

    # ------------------------------------------------------------------------ live

    async def events(request: Request, viewer: Viewer) -> Response:
        cursor = request.headers.get("last-event-id") or request.query_params.get("cursor", "")
        if cursor and not valid_cursor(cursor):
            return Response("cursor must be an event id", status_code=400)
        relay = Relay(viewer.reader.client, cursor, asyncio.get_running_loop())
        return StreamingResponse(relay.frames(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    # ---------------------------------------------------------------------- login

    async def login(request: Request) -> Response:
        if not config.login_required:
            return RedirectResponse("/", status_code=303)
        target = request.query_params.get("next", "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if request.method == "GET":
            return page(request, None, "login.html", title="Log in", next=target, message="")
        if not same_origin(request):
            return page(request, None, "login.html", status=403, title="Log in", next=target,
                        message="log in from this dashboard's own page")
        form = await small_form(request)
        username, password = str(form.get("username", "")), str(form.get("password", ""))
        try:
            sid, _ = await run_in_threadpool(viewers.login, username, password)
        except BalsamError as err:
            return page(request, None, "login.html", status=401, title="Log in", next=target, message=err.message)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, sid, max_age=SESSION_TTL_SECONDS, httponly=True,
                            secure=config.secure_cookies, samesite="strict")
        return response

    async def logout(request: Request, viewer: Viewer) -> Response:
        form = await small_form(request)
        if not check_csrf(request, viewer, form):
            return error_page(request, viewer, 403, "Refused", "the form was not sent from this dashboard")
        await run_in_threadpool(viewers.logout, request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    routes = [
        Route("/", viewer_required(overview)),
        Route("/overview/live", viewer_required(overview_live)),
        Route("/api/analytics", viewer_required(analytics)),
        Route("/jobs", viewer_required(jobs)),
        Route("/jobs/rows", viewer_required(job_rows)),
        Route("/jobs/count", viewer_required(job_count)),
        Route("/jobs/{job_id}", viewer_required(job)),
        Route("/jobs/{job_id}/live", viewer_required(job_live)),
        Route("/jobs/{job_id}/kill", viewer_required(job_kill), methods=["GET", "POST"]),
        Route("/jobs/{job_id}/retry", viewer_required(job_retry), methods=["GET", "POST"]),
        Route("/batch-jobs", viewer_required(batch_jobs)),
        Route("/batch-jobs/live", viewer_required(batch_jobs)),
        Route("/transfers", viewer_required(transfers)),
        Route("/transfers/live", viewer_required(transfers)),
        Route("/events", viewer_required(events)),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", viewer_required(logout), methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=config.allowed_hosts)]
    return Starlette(routes=routes, middleware=middleware)
