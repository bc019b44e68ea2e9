"""Serving the operator screen: uvicorn in the runtime's event loop, over TLS wherever it leaves this machine.

- ``tls_certificate`` and ``tls_key``: HTTPS with the site's certificate
  (checked to load before the server starts; a bad file fails with its name);
- ``tls_self_signed``: HTTPS with a certificate made at each start, in a
  private temporary folder deleted at the end; browsers warn, and the log
  says so loudly with the certificate's SHA-256 fingerprint to compare;
- neither: plain HTTP, on a loopback address only, unless
  ``allow_plain_http`` says a reverse proxy in front terminates TLS.

uvicorn's own ``X-Forwarded-*`` handling is off: the screen believes
forwarded addresses only from its configured proxies
(:func:`interfaces.web.security.client_address`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import structlog

from controller.runtime import Runtime
from controller.runtime_config import ScreenSettings, is_loopback
from interfaces.audit import AuditTrail
from interfaces.opcua_certificates import create_certificate, fingerprint
from interfaces.passwords import load_password_policy
from interfaces.serving import serve_asgi
from interfaces.users import UserStore
from plant_models.errors import ConfigError

log = structlog.get_logger("bioreactor_mpc")

SELF_SIGNED_DAYS = 397
"""Validity of a self-signed certificate (made afresh at every start): the longest browsers accept for a server certificate."""


@contextlib.contextmanager
def tls_files(settings: ScreenSettings) -> Iterator[tuple[Path, Path] | None]:
    """The certificate and key files to serve with (None: plain HTTP); a self-signed pair lives as long as the context."""
    if settings.tls_certificate is not None and settings.tls_key is not None:
        check_tls_files(settings.tls_certificate, settings.tls_key)
        yield settings.tls_certificate, settings.tls_key
        return
    if not settings.tls_self_signed:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="bioreactor-mpc-screen-") as folder:
        certificate_path, key_path = Path(folder) / "screen.pem", Path(folder) / "screen-key.pem"
        hostname = socket.gethostname()
        names = dict.fromkeys(name for name in (settings.host, hostname, socket.getfqdn(), "localhost", "127.0.0.1", "::1") if name and name not in ("0.0.0.0", "::"))
        certificate = create_certificate(
            certificate_path,
            key_path,
            common_name=f"bioreactor-mpc operator screen {hostname}",
            application_uri=f"urn:{hostname}:bioreactor-mpc:screen",
            hostnames=list(names),
            days=SELF_SIGNED_DAYS,
        )
        log.warning(
            "screen_self_signed_certificate",
            sha256_fingerprint=fingerprint(certificate),
            hosts=list(names),
            reason="browsers will warn that the screen's certificate is not trusted: compare the fingerprint they show with this one before logging in, "
            "and install a certificate from the site's CA (screen.tls_certificate, screen.tls_key); a new one is made at every start",
        )
        yield certificate_path, key_path


def check_tls_files(certificate: Path, key: Path) -> None:
    """Raise :class:`ConfigError` naming the files unless they load as a certificate chain and its key."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"screen: tls_certificate {certificate} and tls_key {key} cannot serve HTTPS: {error}") from error


def check_plain_http(settings: ScreenSettings) -> None:
    """Refuse plain HTTP off the loopback (settings copied without validation skip the config's own check)."""
    if settings.tls or is_loopback(settings.host):
        return
    if not settings.allow_plain_http:
        raise ConfigError(
            f"screen: host {settings.host} is not a loopback address, and plain HTTP there sends passwords and sessions in clear: "
            "set screen.tls_certificate and screen.tls_key (or screen.tls_self_signed: true), or screen.allow_plain_http: true when a reverse proxy in front terminates TLS"
        )
    log.warning(
        "screen_plain_http",
        host=settings.host,
        reason="allow_plain_http: the screen serves plain HTTP; only a reverse proxy that terminates TLS may reach it (firewall the port to the proxy)",
    )


@contextlib.asynccontextmanager
async def serve_screen(runtime: Runtime, settings: ScreenSettings, history_path: Path, *, audit: AuditTrail | None = None) -> AsyncIterator[str]:
    """The operator screen on uvicorn in this event loop, for as long as the context lasts; yields its URL.

    ``audit``: the runtime's own (keyed) trail, which records every log-in, failed log-in, log-out and session expiry of the screen's
    users (:class:`~interfaces.users.UserStore`); without it those are not recorded, and a keyed trail refuses them.
    """
    from interfaces.web.app import create_app

    check_plain_http(settings)
    with tls_files(settings) as tls:
        policy = load_password_policy(settings.password_policy) if settings.password_policy is not None else None
        users = UserStore(history_path, audit=audit, actor="screen", policy=policy)
        try:
            app = create_app(runtime=runtime, users=users, audit=AuditTrail(history_path, read_only=True), history_path=history_path, settings=settings)
            async with serve_asgi(app, host=settings.host, port=settings.port, setting="screen", tls=tls) as url:
                log.info("screen_serving", url=url, tls=tls is not None)
                yield url
        finally:
            users.close()
