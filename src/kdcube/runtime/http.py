"""Serve an ASGI app with Hypercorn inside the caller's task group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskStatus
from hypercorn.config import Config, Sockets
from hypercorn.utils import wrap_app

from kdcube.runtime.hypercorn_patch import guard_h3_close, guard_tcp_send

guard_tcp_send()
guard_h3_close()

_GRACEFUL_S = 5.0


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = _GRACEFUL_S
    config.keep_alive_timeout = 75
    # Browsers open streams in bursts (a page reload reconnects them all);
    # Hypercorn's default backlog of 100 overflows under such a burst.
    config.backlog = 2048
    return config


async def serve_http(
    app: Any,
    config: Config,
    *,
    shutdown: anyio.Event,
    sockets: Sockets | None = None,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, report the URLs as started, serve until ``shutdown`` is set.

    The sockets are bound here, before serving, so that port 0 resolves to a
    real port that can be reported; a caller that needs them earlier (to
    serve some of them apart) binds them itself and passes ``sockets``.
    """
    if sockets is None:
        sockets = config.create_sockets()
    for sock in sockets.insecure_sockets + sockets.secure_sockets:
        sock.listen(config.backlog)
    urls = [_url(sock, secure=False) for sock in sockets.insecure_sockets]
    urls += [_url(sock, secure=True) for sock in sockets.secure_sockets]
    await run_worker(
        wrap_app(app, config.wsgi_max_body_size, None),
        config,
        sockets,
        shutdown,
        on_listening=lambda: task_status.started(urls),
    )


async def run_worker(
    wrapped: Any,
    config: Config,
    sockets: Sockets,
    shutdown: anyio.Event,
    *,
    on_listening: Callable[[], None] = lambda: None,
) -> None:
    """One Hypercorn worker on already bound sockets, on this event loop."""
    if sniffio.current_async_library() == "trio":
        from hypercorn.trio.run import worker_serve as trio_serve

        await trio_serve(
            wrapped,
            config,
            sockets=sockets,
            shutdown_trigger=shutdown.wait,
            task_status=_Relay(on_listening),
        )
    else:
        from hypercorn.asyncio.run import worker_serve as asyncio_serve

        on_listening()
        await asyncio_serve(
            wrapped, config, sockets=sockets, shutdown_trigger=shutdown.wait
        )


class _Relay:
    """Hypercorn reports its binds; we report URLs with the real port."""

    def __init__(self, on_listening: Callable[[], None]) -> None:
        self._on_listening = on_listening

    def started(self, _binds: object = None) -> None:
        self._on_listening()


def _url(sock: Any, *, secure: bool) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if secure else 'http'}://{shown}:{port}"
