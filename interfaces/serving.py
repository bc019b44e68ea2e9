"""One way to serve an ASGI application from the runtime's own event loop: the operator screen and the monitoring port both use it.

uvicorn serves on a socket bound first, so that a port already in use is a
:class:`~plant_models.errors.ConfigError` naming the setting (another
runtime on the same port would otherwise be the one reached). uvicorn leaves
the runtime's SIGINT and SIGTERM alone, its log records go to the root logger
and so come out as the runtime's own (``log_config=None``, no access log),
it never believes forwarded headers (the screen decides whom to trust,
:mod:`interfaces.web.security`), and it names no server in its responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from plant_models.errors import ConfigError

STARTUP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def serve_asgi(app: Any, *, host: str, port: int, setting: str, tls: tuple[Path, Path] | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on ``host``:``port`` (0: a free port) for as long as the context lasts; yields the base URL (``https`` with ``tls``).

    ``setting``: the config section the host and port come from (``screen``, ``monitoring``), named in the errors.
    ``tls``: the PEM certificate and key files to serve HTTPS with.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the runtime owns SIGINT and SIGTERM
            yield

    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"{setting}: cannot listen on {host}:{port}: {error.strerror or error} ({setting}.host, {setting}.port)") from error
    bound = listener.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        proxy_headers=False,
        server_header=False,
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
    )
    server = Server(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT_S
    while not (server.started or task.done()) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if not server.started:
        task.cancel()
        listener.close()
        raise ConfigError(f"{setting}: uvicorn did not start on {host}:{bound}")
    shown = f"[{host}]" if ":" in host else host
    try:
        yield f"{'https' if tls else 'http'}://{shown}:{bound}/"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, SHUTDOWN_TIMEOUT_S)
        listener.close()
