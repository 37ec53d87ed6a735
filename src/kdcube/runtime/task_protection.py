"""ECS task scale-in protection while a processor has turns in flight.

A scale-in or a deployment may stop any task of a service; a protected task
is skipped. The ECS agent inside every task serves ``$ECS_AGENT_URI``, where
``PUT /task-protection/v1/state`` switches protection on for a number of
minutes or off. ``TaskProtection.update`` is called with whether the process
is busy: it protects the task when work starts, renews the protection before
it lapses while work goes on, and releases it when the process goes idle.

Nothing here raises into the caller: a refused or failed call is logged and
the state is left as it was, so the next ``update`` tries again. Without
``ECS_AGENT_URI`` (not on ECS) every update does nothing.

Known shortcoming: the agent's own clock decides when protection lapses. The
renewal is timed from the moment the request was sent, so a slow answer only
makes it earlier, but a process paused for longer than ``renew_before_s``
(a stopped container, a frozen VM) can find its task unprotected.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import structlog

__all__ = ["AGENT_URI_VARIABLE", "TaskProtection"]

log = structlog.get_logger("kdcube.runtime")

AGENT_URI_VARIABLE = "ECS_AGENT_URI"
_STATE_PATH = "/task-protection/v1/state"
_MAX_EXPIRES_MINUTES = 2880


class TaskProtection:
    """Keeps this ECS task protected from scale-in while it is busy.

    ``agent_uri`` is the value of ``ECS_AGENT_URI`` (see ``from_environment``);
    None turns every update into a no-op. ``clock`` returns seconds and only
    needs to be monotonic; tests pass a fake one.
    """

    def __init__(
        self,
        agent_uri: str | None,
        http: httpx.AsyncClient,
        *,
        expires_minutes: int = 60,
        renew_before_s: float = 300.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        if not 1 <= expires_minutes <= _MAX_EXPIRES_MINUTES:
            raise ValueError(
                f"expires_minutes must be 1..{_MAX_EXPIRES_MINUTES} (ECS limit),"
                f" got {expires_minutes!r}"
            )
        if not 0 <= renew_before_s < expires_minutes * 60:
            raise ValueError(
                f"renew_before_s must be below expires_minutes * 60"
                f" ({expires_minutes * 60}), got {renew_before_s!r}"
            )
        self._url = agent_uri.rstrip("/") + _STATE_PATH if agent_uri else None
        self._http = http
        self._expires_minutes = expires_minutes
        self._renew_before_s = renew_before_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._protected_until: float | None = None
        self._said_disabled = False
        # Updates from several workers must not interleave their PUTs, or an
        # older "off" could land after a newer "on".
        self._lock = anyio.Lock()

    @classmethod
    def from_environment(
        cls, http: httpx.AsyncClient, **options: Any
    ) -> TaskProtection:
        return cls(os.environ.get(AGENT_URI_VARIABLE) or None, http, **options)

    @property
    def protected(self) -> bool:
        """Whether the agent last confirmed protection and it has not lapsed."""
        until = self._protected_until
        return until is not None and self._clock() < until

    async def update(self, busy: bool) -> None:
        """Bring the task's protection in line with ``busy``; never raises."""
        if self._url is None:
            self._say_disabled_once()
            return

        async with self._lock:
            if busy and self._needs_protection():
                await self._protect(self._url)
            elif not busy and self._protected_until is not None:
                await self._release(self._url)

    def _say_disabled_once(self) -> None:
        if not self._said_disabled:
            self._said_disabled = True
            log.info("task_protection.disabled", reason=f"{AGENT_URI_VARIABLE} unset")

    def _needs_protection(self) -> bool:
        until = self._protected_until
        return until is None or self._clock() >= until - self._renew_before_s

    async def _protect(self, url: str) -> None:
        sent_at = self._clock()
        renewal = self._protected_until is not None
        body: dict[str, object] = {
            "ProtectionEnabled": True,
            "ExpiresInMinutes": self._expires_minutes,
        }
        if await self._put(url, body):
            self._protected_until = sent_at + self._expires_minutes * 60
            event = "task_protection.renewed" if renewal else "task_protection.enabled"
            log.info(event, expires_minutes=self._expires_minutes)

    async def _release(self, url: str) -> None:
        if await self._put(url, {"ProtectionEnabled": False}):
            self._protected_until = None
            log.info("task_protection.released")

    async def _put(self, url: str, body: dict[str, object]) -> bool:
        """Send one state change; True only when the agent confirmed it."""
        enabled = body["ProtectionEnabled"]
        # httpx's timeout bounds each phase; this bounds the whole call.
        with anyio.move_on_after(self._timeout_s) as deadline:
            try:
                response = await self._http.put(url, json=body, timeout=self._timeout_s)
            except httpx.HTTPError as exc:
                log.warning(
                    "task_protection.unreachable",
                    enabled=enabled,
                    error=f"{type(exc).__name__}: {exc}",
                )
                return False

        if deadline.cancelled_caught:
            log.warning(
                "task_protection.timeout", enabled=enabled, timeout_s=self._timeout_s
            )
            return False
        return _confirmed(response, enabled)


def _confirmed(response: httpx.Response, enabled: object) -> bool:
    answer = _json_object(response)
    if response.is_success and isinstance(answer.get("protection"), dict):
        return True

    log.warning(
        "task_protection.refused",
        enabled=enabled,
        status=response.status_code,
        reason=_refusal_reason(answer),
    )
    return False


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _refusal_reason(answer: dict[str, Any]) -> str:
    """The agent's reason: ``failure`` (ECS refused) or ``error`` (the agent or
    its call to ECS failed); anything else is an answer we do not know."""
    failure = answer.get("failure")
    if isinstance(failure, dict):
        return _joined(failure.get("Reason"), failure.get("Detail"))
    error = answer.get("error")
    if isinstance(error, dict):
        return _joined(error.get("Code"), error.get("Message"))
    return "unrecognised answer"


def _joined(code: object, detail: object) -> str:
    return f"{code}: {detail}" if detail else str(code)
