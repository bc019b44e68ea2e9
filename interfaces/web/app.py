"""The operator screen, served by the runtime itself: overview, estimate, trajectories, the recommendation and its signature.

FastAPI with server-rendered pages (Jinja2) and Plotly for the plots; the
Plotly bundle comes from the installed ``plotly`` package, so the screen
needs no network beyond the edge controller. The pages poll two JSON
endpoints (``/api/status`` every 2 s, ``/api/trajectories`` every 15 s).

Who may do what (roles of :mod:`interfaces.users`):

- viewer: log in and see the batch, the estimate, the forecast and the recommendation;
- operator: approve or reject the current recommendation, named by its id and
  content digest, re-entering the password (an electronic signature, 21 CFR
  Part 11 §11.50 and §11.200);
- engineer: also change the requested mode, acknowledge a held physical
  contradiction and re-enable the NMPC after it stood down for the platform
  recipe (each again with the password, each audited);
- reading the audit trail (``/api/audit``) is its own right
  (:func:`interfaces.users.can_read_audit`: QA and engineers).

Sessions: an HttpOnly, SameSite=Strict cookie holding a random token (only its
hash is stored), expiring after idle time and at a maximum age, ``Secure``
whenever the screen is served over TLS. Every state-changing request needs
the screen's origin and the session's CSRF token, and every response carries
the security headers (:mod:`interfaces.web.security`). ``/metrics``
(Prometheus text format), ``/healthz`` and ``/readyz`` need no login: they
are for the plant's monitoring on the control network, the same endpoints
as on the runtime's monitoring port (:mod:`interfaces.monitoring`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import plotly
from fastapi import Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from controller.advisory import ApprovalRefusedError, MalformedSignatureError, Signer, check_signature_target
from controller.modes import RequestedMode
from controller.runtime import Runtime
from controller.runtime_config import ScreenSettings
from controller.types import json_compatible
from interfaces.audit import AuditTrail
from interfaces.monitoring import Monitor
from interfaces.users import LoginPurpose, Role, User, UserStore, can_read_audit
from interfaces.web.security import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, ScreenGuard, client_address, csrf_token, new_secret

HERE = Path(__file__).resolve().parent
PLOTLY_JS = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
TRAJECTORY_STATES = ("viable_cells", "glucose", "lactate", "ammonia", "titer", "volume")
LAB_COLUMNS = {
    "viable_cells": "vcd_1e6_per_ml",
    "viability": "viability_pct",
    "glucose": "glucose_g_per_l",
    "lactate": "lactate_g_per_l",
    "ammonia": "ammonia_mm",
    "titer": "titer_g_per_l",
    "osmolality": "osmolality_mosm_per_kg",
}


ADDRESS_ATTEMPTS = 20
"""Failed log-ins from one client address, whatever the user names, within the throttle's window before that address is refused."""


class LoginThrottle:
    """Refuses a key (a user name from one address, or a signer) after ``attempts`` failures within ``window_s``.

    The user store never locks an account (that would let anyone lock the
    operators out of a running batch); the screen slows password guessing
    instead, per user name *and* client address at login (the connection's
    peer, or what a trusted proxy says in ``X-Forwarded-For``:
    :func:`interfaces.web.security.client_address`), so a stranger
    cannot block an operator who logs in from elsewhere, and separately for
    signatures (by logged-in users only). One address is also refused after
    :data:`ADDRESS_ATTEMPTS` failures with any user names (a guesser who
    changes the name each time; each check costs both cores 0.2 s of argon2). In memory and bounded: a restart
    forgets, and the oldest keys are dropped beyond ``max_keys``.
    """

    def __init__(self, *, attempts: int = 5, window_s: float = 300.0, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._failures: dict[str, list[float]] = {}

    def blocked(self, key: str) -> bool:
        now = self._clock()
        recent = [t for t in self._failures.get(key, []) if now - t < self.window_s]
        if recent:
            self._failures[key] = recent
        else:
            self._failures.pop(key, None)
        return len(recent) >= self.attempts

    def failed(self, key: str) -> None:
        self._failures.setdefault(key, []).append(self._clock())
        while len(self._failures) > self.max_keys:
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


class LoginError(str, Enum):
    """Why a log-in did not succeed, as ``/login?error=`` carries it: a code, never text (the page shows only its own messages)."""

    CREDENTIALS = "credentials"
    THROTTLED = "throttled"


LOGIN_MESSAGES = {
    LoginError.CREDENTIALS: "wrong user name or password",
    LoginError.THROTTLED: "too many failed attempts: wait five minutes",
}
UNKNOWN_LOGIN_ERROR = "the log-in did not succeed: try again"


def login_message(code: str | None) -> str | None:
    """The fixed text for a ``/login?error=`` code (a generic one for a code the screen never sends); None without a code."""
    if code is None:
        return None
    try:
        return LOGIN_MESSAGES[LoginError(code)]
    except ValueError:
        return UNKNOWN_LOGIN_ERROR


class Signature(BaseModel):
    password: str = Field(min_length=1, description="the signer's password, entered again to sign")
    reason: str = Field(min_length=1, max_length=500, description="why")


class RecommendationSignature(Signature):
    digest: str = Field(description="the content digest of the recommendation as the screen showed it (its status's 'digest')")


class ModeChange(Signature):
    mode: RequestedMode


def create_app(*, runtime: Runtime, users: UserStore, audit: AuditTrail, history_path: Path, settings: ScreenSettings | None = None) -> FastAPI:
    """The screen's application for one runtime, served as ``settings`` say (TLS: Secure cookies and HSTS; trusted proxies; allowed origins)."""
    settings = settings or ScreenSettings()
    secure_cookies = settings.tls or settings.secure_cookies
    proxies = settings.proxy_networks
    app = FastAPI(title="bioreactor-mpc", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(ScreenGuard, tls=settings.tls, allowed_origins=settings.allowed_origins)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.host_names))  # outermost: a foreign Host (DNS rebinding) gets 400 before anything
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    logins, signatures = LoginThrottle(), LoginThrottle()
    addresses = LoginThrottle(attempts=ADDRESS_ATTEMPTS)  # one client guessing a new user name each time is slowed too
    password_checks = threading.Semaphore(2)  # argon2 costs 64 MiB and 0.1 s a check: at most two at a time beside the NMPC

    def authenticate(name: str, password: str, purpose: LoginPurpose = LoginPurpose.SESSION) -> User | None:
        with password_checks:
            return users.authenticate(name, password, purpose=purpose)

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def current_user(request: Request) -> User:
        token = request.cookies.get(SESSION_COOKIE)
        background = request.headers.get("X-Background-Refresh") == "1"  # the page's polling is not a person's activity
        user = users.session_user(token, activity=not background) if token else None
        if user is None:
            raise HTTPException(status_code=401, detail="log in first (or the session expired)")
        return user

    def require(role: Role) -> Callable[[User], User]:
        def check(user: User = Depends(current_user)) -> User:
            if not user.role.allows(role):
                raise HTTPException(status_code=403, detail=f"{user.name} is a {user.role.value}; this needs a {role.value}")
            return user

        return check

    async def signer(user: User, password: str) -> Signer:
        if signatures.blocked(user.name):
            raise HTTPException(status_code=429, detail="too many wrong passwords: wait five minutes")
        if await asyncio.to_thread(authenticate, user.name, password, LoginPurpose.SIGNATURE) is None:
            signatures.failed(user.name)
            raise HTTPException(status_code=403, detail="wrong password: the signature needs the signer's own password")
        signatures.succeeded(user.name)
        return Signer(user.name, user.full_name, user.role.value)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        if error.status_code == 401 and not request.url.path.startswith("/api/"):
            return RedirectResponse("/login", status_code=303)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)

    def page(request: Request, template: str, context: dict[str, Any], *, secret: str) -> Response:
        return templates.TemplateResponse(request, template, {**context, "csrf_token": csrf_token(secret), "csrf_field": CSRF_FIELD})

    # ------------------------------------------------------------------ pages

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, error: str | None = None) -> Response:
        secret = request.cookies.get(LOGIN_COOKIE) or new_secret()
        response = page(request, "login.html", {"error": login_message(error), "batch_id": runtime.batch.batch_id}, secret=secret)
        response.set_cookie(LOGIN_COOKIE, secret, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    @app.post("/login")
    def login(request: Request, username: str = Form(...), password: str = Form(...)) -> Response:
        address = client_address(request.client.host if request.client else None, request.headers.getlist("x-forwarded-for"), proxies)
        key = f"{username}@{address}"
        if logins.blocked(key) or addresses.blocked(address):
            return RedirectResponse(f"/login?error={LoginError.THROTTLED.value}", status_code=303)
        user = authenticate(username, password)
        if user is None:
            logins.failed(key)
            addresses.failed(address)  # not forgotten at a success: a guesser's own account must not reset it
            return RedirectResponse(f"/login?error={LoginError.CREDENTIALS.value}", status_code=303)
        logins.succeeded(key)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, users.create_session(user), httponly=True, samesite="strict", secure=secure_cookies)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            users.end_session(token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/", response_class=HTMLResponse)
    def screen(request: Request, user: User = Depends(current_user)) -> Response:
        context = {
            "user": user,
            "batch_id": runtime.batch.batch_id,
            "modes": [m.value for m in RequestedMode],
            "can_sign": user.role.allows(Role.OPERATOR),
            "can_change_mode": user.role.allows(Role.ENGINEER),
            "can_reenable": user.role.allows(Role.ENGINEER),
        }
        return page(request, "screen.html", context, secret=request.cookies.get(SESSION_COOKIE, ""))

    @app.get("/static-vendor/plotly.min.js")
    def plotly_js() -> Response:
        return FileResponse(PLOTLY_JS, media_type="text/javascript")

    # ------------------------------------------------------------------ data

    @app.get("/api/status")
    def status(user: User = Depends(current_user)) -> dict[str, Any]:
        view = runtime.view()
        view["user"] = {"name": user.name, "full_name": user.full_name, "role": user.role.value}
        return json_compatible(view)

    @app.get("/api/trajectories")
    def trajectories(user: User = Depends(current_user)) -> dict[str, Any]:
        data = read_trajectories(history_path)
        data["forecast"] = forecast_series(runtime)
        return json_compatible(data)

    def audit_reader(user: User = Depends(current_user)) -> User:
        if not can_read_audit(user.role):
            readers = " or ".join(role.value for role in Role if can_read_audit(role))
            raise HTTPException(status_code=403, detail=f"{user.name} is a {user.role.value}; reading the audit trail needs the role {readers}")
        return user

    @app.get("/api/audit")
    def audit_records(limit: int = 50, user: User = Depends(audit_reader)) -> list[dict[str, Any]]:
        head = audit.head()
        last = head.seq if head is not None else 0
        records = audit.records(since_seq=max(0, last - max(1, min(limit, 500))))
        return [json_compatible(record.__dict__) for record in records]

    # ------------------------------------------------------------------ signatures and mode

    @app.post("/api/recommendations/{recommendation_id}/{action}")
    async def sign(recommendation_id: str, action: Literal["approve", "reject"], body: RecommendationSignature, user: User = Depends(require(Role.OPERATOR))) -> dict[str, Any]:
        sign_as = runtime.approve if action == "approve" else runtime.reject
        try:
            check_signature_target(recommendation_id, body.digest)  # before the password is checked: garbage costs no argon2
            recommendation = await sign_as(recommendation_id, body.digest, signer=await signer(user, body.password), reason=body.reason)
        except MalformedSignatureError as error:
            raise HTTPException(status_code=422, detail=str(error)) from error
        except ApprovalRefusedError as error:
            raise HTTPException(status_code=409, detail=str(error)) from error
        return json_compatible(recommendation.as_dict())

    @app.post("/api/mode")
    async def change_mode(body: ModeChange, user: User = Depends(require(Role.ENGINEER))) -> dict[str, Any]:
        await signer(user, body.password)
        try:
            runtime.request_mode(body.mode, user=user.name, reason=body.reason)
        except ApprovalRefusedError as error:
            raise HTTPException(status_code=409, detail=str(error)) from error
        return {"requested_mode": body.mode.value, "effective": "at the next cycle"}

    @app.post("/api/contradictions/{code}/acknowledge")
    async def acknowledge(code: str, body: Signature, user: User = Depends(require(Role.ENGINEER))) -> dict[str, Any]:
        await signer(user, body.password)
        try:
            await runtime.acknowledge(code, user=user.name, reason=body.reason)
        except ApprovalRefusedError as error:
            raise HTTPException(status_code=409, detail=str(error)) from error
        return {"acknowledged": code, "effective": "at the next cycle"}

    @app.post("/api/nmpc/reenable")
    async def reenable_nmpc(body: Signature, user: User = Depends(require(Role.ENGINEER))) -> dict[str, Any]:
        await signer(user, body.password)
        try:
            await runtime.reenable_nmpc(user=user.name, reason=body.reason)
        except ApprovalRefusedError as error:
            raise HTTPException(status_code=409, detail=str(error)) from error
        return {"reenabled": True, "effective": "at the next cycle"}

    # ------------------------------------------------------------------ operations: /metrics, /healthz, /readyz, as on the monitoring port

    app.router.routes.extend(Monitor(runtime).routes())

    return app


FORECAST_QUANTITIES = (*TRAJECTORY_STATES, "viability", "osmolality")


def forecast_series(runtime: Runtime) -> dict[str, Any] | None:
    """The plan's forecast to harvest (mean and sd per quantity), or None when there is none."""
    predicted = runtime.forecast
    if predicted is None:
        return None
    t = predicted.times_h.tolist()
    return {name: {"t": t, "mean": predicted.value(name).tolist(), "sd": predicted.sd(name).tolist()} for name in FORECAST_QUANTITIES}


def read_trajectories(history_path: Path) -> dict[str, Any]:
    """Estimates with their standard deviations, lab results and online volume from the history (a read-only connection)."""
    uri = f"file:{history_path}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=5.0)) as db:
        run = db.execute("SELECT MAX(id) FROM runs").fetchone()[0]
        batch = db.execute("SELECT batch_id FROM runs WHERE id = ?", (run,)).fetchone()
        runs = [row[0] for row in db.execute("SELECT id FROM runs WHERE batch_id = ?", (batch[0],))] if batch else []
        marks = ",".join("?" * len(runs)) or "NULL"
        estimates: dict[str, dict[str, list[float | None]]] = {name: {"t": [], "mean": [], "sd": []} for name in TRAJECTORY_STATES}
        for t_h, estimate in db.execute(f"SELECT process_time_h, estimate FROM cycles WHERE run_id IN ({marks}) ORDER BY process_time_h", runs):
            data = json.loads(estimate) if estimate else None
            if not data:
                continue
            for name in TRAJECTORY_STATES:
                estimates[name]["t"].append(t_h)
                estimates[name]["mean"].append(data["state"][name])
                estimates[name]["sd"].append(data["sd"][name])
        lab: dict[str, dict[str, list[float | None]]] = {name: {"t": [], "value": []} for name in LAB_COLUMNS}
        columns = ", ".join(LAB_COLUMNS.values())
        for row in db.execute(f"SELECT taken_at_h, {columns} FROM lab_results WHERE run_id IN ({marks}) ORDER BY taken_at_h", runs):
            for name, value in zip(LAB_COLUMNS, row[1:], strict=True):
                lab[name]["t"].append(row[0])
                lab[name]["value"].append(value)
        volume = db.execute(f"SELECT process_time_h, value FROM readings WHERE signal = 'PV.Volume' AND good = 1 AND run_id IN ({marks}) ORDER BY process_time_h", runs).fetchall()
    return {"estimates": estimates, "lab": lab, "online": {"volume": {"t": [r[0] for r in volume], "value": [r[1] for r in volume]}}}
