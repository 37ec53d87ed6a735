"""Administration routes for the live documents, privileged users only.

Two documents are live on the bus: the gateway config (``/admin/gateway``)
and the bundle registry (``/admin/bundles``). For each, ``GET`` shows the one
in force and its version; ``POST`` validates a YAML or JSON document and
applies it to every process; ``/validate`` only checks one; ``/reset`` goes
back to what the processes started from. An invalid document is refused with
the reason, and the one in force stays.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import structlog
from quart import Quart, request

from kdcube.bundles import BundleRegistry
from kdcube.bus.board import Board, Codec
from kdcube.gateway import Breakers, GatewayConfig
from kdcube.identity import Identity, UserType
from kdcube.wire.errors import ApiError, bad_request

log = structlog.get_logger("kdcube.admin")

Json = dict[str, Any]
Identify = Callable[[], Awaitable[Identity]]
T = TypeVar("T")

_TEXT_TYPES = (
    "application/json",
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
    "text/plain",
)


class _LiveDocument(Generic[T]):
    """The four routes of one live document."""

    def __init__(
        self,
        name: str,
        identify: Identify,
        board: Board[T],
        codec: Codec[T],
        describe: Callable[[T], Json],
        *,
        invalid: str,
    ) -> None:
        self._name = name
        self._invalid = invalid
        self._identify = identify
        self._board = board
        self._codec = codec
        self._describe = describe

    def register(self, app: Quart, extra: Callable[[], Awaitable[Json]]) -> None:
        base = f"/admin/{self._name}"

        async def show() -> tuple[Json, int]:
            await _admin(self._identify)
            current = self._describe(self._board.current())
            return {"version": self._board.version, **current, **await extra()}, 200

        app.add_url_rule(base, f"{self._name}_show", show, methods=["GET"])
        app.add_url_rule(base, f"{self._name}_apply", self.apply, methods=["POST"])
        app.add_url_rule(
            f"{base}/validate",
            f"{self._name}_validate",
            self.validate,
            methods=["POST"],
        )
        app.add_url_rule(
            f"{base}/reset", f"{self._name}_reset", self.reset, methods=["POST"]
        )

    async def validate(self) -> tuple[Json, int]:
        await _admin(self._identify)
        document = await self._document()
        return {"status": "valid", **self._describe(document)}, 200

    async def apply(self) -> tuple[Json, int]:
        admin = await _admin(self._identify)
        document = await self._document()
        version = await self._board.apply(document, actor=admin.user_id)
        log.info(
            "admin.applied", document=self._name, version=version, actor=admin.user_id
        )
        return {
            "status": "applied",
            "version": version,
            **self._describe(document),
        }, 200

    async def reset(self) -> tuple[Json, int]:
        admin = await _admin(self._identify)
        version = await self._board.reset(actor=admin.user_id)
        log.info(
            "admin.reset", document=self._name, version=version, actor=admin.user_id
        )
        current = self._describe(self._board.current())
        return {"status": "reset", "version": version, **current}, 200

    async def _document(self) -> T:
        if request.mimetype not in _TEXT_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"Send {self._name} as YAML or JSON (for example application/yaml).",
            )
        raw = await request.get_data(as_text=False)
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            return self._codec.parse(text)
        except UnicodeDecodeError:
            raise bad_request(self._invalid, "The document is not UTF-8.") from None
        except ValueError as exc:
            raise bad_request(self._invalid, str(exc)) from None


class AdminRoutes:
    def __init__(
        self,
        identify: Identify,
        gateway: Board[GatewayConfig],
        gateway_codec: Codec[GatewayConfig],
        breakers: Breakers,
        bundles: Board[BundleRegistry],
        bundles_codec: Codec[BundleRegistry],
    ) -> None:
        self._breakers = breakers
        self._gateway = _LiveDocument(
            "gateway",
            identify,
            gateway,
            gateway_codec,
            _gateway_view,
            invalid="invalid_gateway_config",
        )
        self._bundles = _LiveDocument(
            "bundles",
            identify,
            bundles,
            bundles_codec,
            _registry_view,
            invalid="invalid_bundle_registry",
        )

    def register(self, app: Quart) -> None:
        self._gateway.register(app, self._breaker_view)
        self._bundles.register(app, _nothing)

    async def _breaker_view(self) -> Json:
        statuses = await self._breakers.statuses()
        return {
            "breakers": {
                status.name: {"state": status.state.value, "failures": status.failures}
                for status in statuses
            }
        }


async def _nothing() -> Json:
    return {}


async def _admin(identify: Identify) -> Identity:
    identity = await identify()
    if identity.user_type is UserType.ANONYMOUS:
        raise ApiError(401, "invalid_token", "Sign in as an administrator.")
    if identity.user_type is not UserType.PRIVILEGED:
        raise ApiError(403, "forbidden", "Only privileged users administer.")
    return identity


def _gateway_view(config: GatewayConfig) -> Json:
    return {"config": config.model_dump(mode="json")}


def _registry_view(registry: BundleRegistry) -> Json:
    return dict(registry.document()["bundles"])
