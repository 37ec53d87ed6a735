"""API errors: one exception type, rendered as PROTOCOL.md's JSON error body."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A request that gets a clear error answer instead of a result."""

    def __init__(
        self, status: int, code: str, detail: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(self.retry_after)}


def bad_request(code: str, detail: str) -> ApiError:
    return ApiError(400, code, detail)


def not_found(what: str) -> ApiError:
    return ApiError(404, f"{what}_not_found", f"No such {what.replace('_', ' ')}.")


def draining(retry_after: int = 5) -> ApiError:
    return ApiError(
        503,
        "draining",
        "This server is shutting down; retry on another replica.",
        retry_after=retry_after,
    )
