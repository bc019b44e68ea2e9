"""What keeps the operator screen from being used by anyone but the person at it: the client's address, CSRF tokens, origins, headers.

- :func:`client_address`: the address the login throttle counts, from the
  connection's peer; ``X-Forwarded-For`` only when that peer is a configured
  reverse proxy (anyone else could send any address in it and start afresh).
- :class:`ScreenGuard`, an ASGI middleware around the whole application:
  every state-changing request (any method but GET, HEAD, OPTIONS) must come
  from the screen's own origin (``Origin``, else ``Referer``) and carry the
  session's CSRF token (``X-CSRF-Token`` from the page's scripts, or the
  ``csrf_token`` field of a form), and its body may not exceed
  :data:`MAX_BODY_BYTES` (read here, before any route: the screen runs in the
  runtime's process, and a body of hundreds of megabytes, buffered whole and
  parsed before the log-in is checked, would take the controller's memory);
  every response carries the security headers of :func:`security_headers`.

The CSRF token of a session is an HMAC of its cookie (which the page's scripts
cannot read: HttpOnly), so it needs no storage and survives a restart; the
log-in form, before any session, uses a random cookie of its own the same way.
docs/operator-screen.md, section "Security", says why each is there.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

log = structlog.get_logger(__name__)

SESSION_COOKIE = "bioreactor_mpc_session"
LOGIN_COOKIE = "bioreactor_mpc_login"
"""A random value set with the log-in page, from which the log-in form's CSRF token is derived (there is no session yet)."""
LOGIN_PATH = "/login"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY_BYTES = 64 * 1024
"""The body of a state-changing request: a form (log-in, log-out) or a signature's JSON is a few hundred bytes; a longer one is refused (413) as it arrives."""
HSTS_MAX_AGE_S = 365 * 24 * 3600
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
"""Scripts, styles and data from the screen itself only; no inline script; no framing (with X-Frame-Options for old browsers)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(secret: str) -> str:
    """The CSRF token of a session (or of the log-in form) whose cookie holds ``secret``."""
    return hmac.new(secret.encode("utf-8"), b"bioreactor-mpc csrf v1", hashlib.sha256).hexdigest()


def client_address(peer: str | None, forwarded_for: Sequence[str], proxies: Sequence[Network]) -> str:
    """The client's address: the connection's ``peer``, unless the peer is a trusted proxy; then the last address in
    ``X-Forwarded-For`` (all its headers, in order) that is not a trusted proxy.

    Only the right end of ``X-Forwarded-For`` is believed: each trusted proxy appends the address it was connected from, and
    whatever a client wrote to the left of that is the client's own claim. An entry may carry a port (``203.0.113.7:5123``,
    ``[2001:db8::7]:5123``), which is dropped. An entry a trusted proxy wrote that is not an address counts the proxy itself
    (misconfigured, never a way to start afresh). When every entry is a trusted address, the right-most one is the client:
    the entries to its left may have been written by a client inside a trusted network, and a new one with each guess
    would start the throttle afresh.
    """
    if peer is None:
        return "?"
    if not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        address = _hop_address(hop)
        if address is None:
            return peer
        if not any(address in network for network in proxies):
            return str(address)
    return str(_hop_address(hops[-1])) if hops else peer


def _hop_address(hop: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of one ``X-Forwarded-For`` entry, without a port; None when it is not one."""
    candidates = [hop]
    if hop.startswith("["):
        candidates.append(hop[1:].partition("]")[0])
    elif hop.count(":") == 1:
        candidates.append(hop.partition(":")[0])
    for candidate in candidates:
        try:
            return ipaddress.ip_address(candidate)
        except ValueError:
            continue
    return None


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in proxies)


def security_headers(*, tls: bool) -> list[tuple[bytes, bytes]]:
    """The headers every response carries; HSTS only over TLS (a browser ignores it on plain HTTP, and it would lock out a plain-HTTP screen)."""
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",  # not no-referrer: with it, browsers send "Origin: null" on the screen's own posts
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
    }
    if tls:
        headers["Strict-Transport-Security"] = f"max-age={HSTS_MAX_AGE_S}"
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class ScreenGuard:
    """ASGI middleware: the security headers on every response; for every state-changing request, the origin and the CSRF token.

    ``allowed_origins`` are accepted besides the origin the request was served at (scheme and ``Host``): a reverse proxy's public URL.
    ``cacheable`` path prefixes (static files) are not marked ``Cache-Control: no-store``.
    """

    def __init__(self, app: Asgi, *, tls: bool, allowed_origins: Iterable[str] = (), cacheable: tuple[str, ...] = ("/static",)) -> None:
        self.app = app
        self.headers = security_headers(tls=tls)
        self.allowed_origins = frozenset(origin.lower() for origin in allowed_origins)
        self.cacheable = cacheable

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_headers(scope, send)
        if scope["method"] not in SAFE_METHODS:
            connection = HTTPConnection(scope)
            status, problem = 403, self.origin_problem(connection)
            if not problem:
                body, problem = await self._body(connection, receive)
                if problem:
                    status = 413
                else:
                    receive = _replaying(body, receive)
                    problem = self.token_problem(connection, self._submitted_token(connection, body))
            if problem:
                log.warning("request_refused", method=scope["method"], path=scope["path"], reason=problem)
                await JSONResponse({"detail": problem}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _with_headers(self, scope: Scope, send: Send) -> Send:
        no_store = not str(scope["path"]).startswith(self.cacheable)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"cache-control" or not no_store]
                headers.extend(self.headers)
                if no_store:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        return send_with_headers

    def origin_problem(self, connection: HTTPConnection) -> str:
        """Why the request's origin is not the screen's ('' when it is, or when the client sent neither Origin nor Referer: not a browser)."""
        origin = connection.headers.get("origin")
        if origin is None:
            referer = connection.headers.get("referer")
            if referer is None:
                return ""
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        served = f"{connection.url.scheme}://{connection.headers.get('host', '')}".lower()
        if origin.lower() == served or origin.lower() in self.allowed_origins:
            return ""
        return f"cross-site request refused: it comes from {origin!r}, not from this screen ({served})"

    @staticmethod
    async def _body(connection: HTTPConnection, receive: Receive) -> tuple[bytes, str]:
        """The request's whole body, and a problem when it is (or says it is) larger than :data:`MAX_BODY_BYTES` (then only what was read)."""
        too_large = f"request body larger than {MAX_BODY_BYTES} bytes refused"
        declared = connection.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return b"", too_large
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return body, "the client went away"
            body += message.get("body", b"")
            if len(body) > MAX_BODY_BYTES:
                return body, too_large
            if not message.get("more_body", False):
                return body, ""

    @staticmethod
    def _submitted_token(connection: HTTPConnection, body: bytes) -> str | None:
        """The CSRF token the request carries: the ``X-CSRF-Token`` header, else a form's one ``csrf_token`` field."""
        header = connection.headers.get(CSRF_HEADER)
        content_type = connection.headers.get("content-type", "").split(";")[0].strip().lower()
        if header is not None or content_type != "application/x-www-form-urlencoded":
            return header
        values = parse_qs(body.decode("latin-1"), keep_blank_values=True).get(CSRF_FIELD, [])
        return values[0] if len(values) == 1 else None

    @staticmethod
    def token_problem(connection: HTTPConnection, submitted: str | None) -> str:
        """Why the submitted CSRF token is not the one of this session ('' when it is, or when there is no session to misuse)."""
        login = connection.url.path == LOGIN_PATH
        secret = connection.cookies.get(LOGIN_COOKIE if login else SESSION_COOKIE)
        if secret is None:
            return "the log-in form has expired: reload the page and log in again" if login else ""  # no session: the route answers 401
        if submitted is None:
            return f"missing CSRF token ({CSRF_HEADER} header or {CSRF_FIELD} form field): reload the page"
        if not hmac.compare_digest(submitted.encode("utf-8", "replace"), csrf_token(secret).encode("ascii")):
            return "wrong CSRF token (from another page or session): reload the page"
        return ""


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the application the body already read, then what the server sends next (the disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
