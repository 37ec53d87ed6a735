"""The web UI's files, with the single-page app fallback.

A path names a file under the UI folder, or, when it names none and looks
like a page rather than a file (no extension in its last part), the UI's
``index.html``, so the page's own router can read it. The files are small and
few, so each is read whole per request; ``index.html`` is never cached and
the rest is revalidated, since the UI has no build step to fingerprint names.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path, PurePosixPath

import anyio
from werkzeug.security import safe_join

from kdcube.asgi import JSON, Scope, Send, error_body, respond

__all__ = ["StaticFiles", "default_ui_dir"]

_INDEX = "index.html"


def default_ui_dir() -> Path | None:
    """The web UI shipped with kdcube: inside the installed package (a wheel
    carries ``edge/ui`` as ``kdcube/ui``), else ``edge/ui`` of the source
    checkout an editable install runs from."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "ui", package.parents[1] / "edge" / "ui"):
        if (candidate / _INDEX).is_file():
            return candidate
    return None


class StaticFiles:
    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    async def __call__(self, scope: Scope, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await respond(
                send,
                405,
                JSON,
                error_body(
                    "method_not_allowed", "the web UI is only read (GET or HEAD)"
                ),
            )
            return
        path = self._resolve(scope.get("path", "/"))
        if path is None:
            await respond(
                send,
                404,
                JSON,
                error_body("not_found", "nothing is served at this path"),
            )
            return
        body = await anyio.Path(path).read_bytes()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", _content_type(path).encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", _caching(path)),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if method == "HEAD" else body}
        )

    def _resolve(self, url_path: str) -> Path | None:
        relative = url_path.lstrip("/") or _INDEX
        # safe_join refuses "..", absolute parts and other ways out of root.
        joined = safe_join(str(self._root), relative)
        if joined is not None and Path(joined).is_file():
            return Path(joined)
        if "." in PurePosixPath(relative).name:
            return None
        index = self._root / _INDEX
        return index if index.is_file() else None


def _content_type(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    kind = guessed or "application/octet-stream"
    return (
        f"{kind}; charset=utf-8"
        if kind.startswith("text/") or kind.endswith(("javascript", "json"))
        else kind
    )


def _caching(path: Path) -> bytes:
    return b"no-store" if path.name == _INDEX else b"no-cache"
