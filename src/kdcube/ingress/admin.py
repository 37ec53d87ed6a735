"""Administration routes: the live gateway config, for privileged users only.

``GET /admin/gateway`` shows the config in force, its version and the
breakers; ``POST /admin/gateway`` validates a gateway.yaml document (YAML or
JSON) and applies it to every process; ``/validate`` only checks one;
``/reset`` goes back to the config the processes started from. An invalid
document is refused with the reason, and the config in force stays.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from quart import Quart, request

from kdcube.gateway import Breakers, ConfigBoard, GatewayConfig, InvalidGatewayConfig
from kdcube.gateway.config import parse_gateway_config
from kdcube.identity import Identity, UserType
from kdcube.wire.errors import ApiError, bad_request

log = structlog.get_logger("kdcube.admin")

Json = dict[str, Any]
Identify = Callable[[], Awaitable[Identity]]

_TEXT_TYPES = (
    "application/json",
    "application/yaml",
    "application/x-yaml",
    "text/yaml",
    "text/x-yaml",
    "text/plain",
)


class AdminRoutes:
    def __init__(
        self,
        identify: Identify,
        board: ConfigBoard,
        breakers: Breakers,
    ) -> None:
        self._identify = identify
        self._board = board
        self._breakers = breakers

    def register(self, app: Quart) -> None:
        app.add_url_rule("/admin/gateway", view_func=self.show, methods=["GET"])
        app.add_url_rule("/admin/gateway", view_func=self.apply, methods=["POST"])
        app.add_url_rule(
            "/admin/gateway/validate", view_func=self.validate, methods=["POST"]
        )
        app.add_url_rule("/admin/gateway/reset", view_func=self.reset, methods=["POST"])

    async def show(self) -> tuple[Json, int]:
        await self._admin()
        statuses = await self._breakers.statuses()
        return {
            "version": self._board.version,
            "config": _as_json(self._board.current()),
            "breakers": {
                status.name: {"state": status.state.value, "failures": status.failures}
                for status in statuses
            },
        }, 200

    async def validate(self) -> tuple[Json, int]:
        await self._admin()
        config = await self._document()
        return {"status": "valid", "config": _as_json(config)}, 200

    async def apply(self) -> tuple[Json, int]:
        admin = await self._admin()
        config = await self._document()
        version = await self._board.apply(config, actor=admin.user_id)
        log.info("gateway.config_applied", version=version, actor=admin.user_id)
        return {
            "status": "applied",
            "version": version,
            "config": _as_json(config),
        }, 200

    async def reset(self) -> tuple[Json, int]:
        admin = await self._admin()
        version = await self._board.reset(actor=admin.user_id)
        log.info("gateway.config_reset", version=version, actor=admin.user_id)
        return {
            "status": "reset",
            "version": version,
            "config": _as_json(self._board.current()),
        }, 200

    async def _admin(self) -> Identity:
        identity = await self._identify()
        if identity.user_type is UserType.ANONYMOUS:
            raise ApiError(401, "invalid_token", "Sign in as an administrator.")
        if identity.user_type is not UserType.PRIVILEGED:
            raise ApiError(403, "forbidden", "Only privileged users administer.")
        return identity

    async def _document(self) -> GatewayConfig:
        if request.mimetype not in _TEXT_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                "Send gateway.yaml as YAML or JSON (for example application/yaml).",
            )
        raw = await request.get_data(as_text=False)
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            return parse_gateway_config(text)
        except UnicodeDecodeError:
            raise bad_request(
                "invalid_gateway_config", "The document is not UTF-8."
            ) from None
        except InvalidGatewayConfig as exc:
            raise bad_request("invalid_gateway_config", str(exc)) from None


def _as_json(config: GatewayConfig) -> Json:
    return config.model_dump(mode="json")
