"""The ingress HTTP application: routes of PROTOCOL.md on Quart (Quart-Trio on Trio)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NamedTuple

import anyio
import structlog
from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from kdcube.bundles.live import RegistryCodec
from kdcube.bus import BusUnavailable, CancelOutcome, TurnJob, parse_event_id
from kdcube.gateway import Backpressure, Breakers, CircuitOpen
from kdcube.gateway.distribution import GatewayCodec
from kdcube.gateway.guarded import GuardedStore
from kdcube.identity import Identity
from kdcube.identity.extract import TokenCookies
from kdcube.ingress import requests
from kdcube.ingress.admin import AdminRoutes
from kdcube.ingress.guard import Guard, circuit_open_error
from kdcube.ingress.streams import StreamHub, StreamStart
from kdcube.proc.ending import Ending, emitter_for, end_turn
from kdcube.runtime.platform import Platform, registry_base
from kdcube.storage.layout import Layout
from kdcube.store import ConversationNotFound, DeleteOutcome, NewTurn, StoreUnavailable
from kdcube.store.ports import TurnRecord
from kdcube.uploads.download import attachment_response
from kdcube.uploads.filetypes import MAX_MESSAGE_BYTES
from kdcube.uploads.flow import StreamedBodies, gate_of, is_multipart_post
from kdcube.uploads.intake import Intake, StoredFile
from kdcube.uploads.multipart import MalformedMultipart
from kdcube.uploads.parts import open_parts
from kdcube.wire import events, sse
from kdcube.wire.errors import ApiError, bad_request, draining, not_found
from kdcube.wire.events import Route, TurnAddress, now_ms
from kdcube.wire.ids import new_id
from kdcube.wire.submission import CheckedSubmission, Submission, parse_submission

log = structlog.get_logger("kdcube.ingress")

Json = dict[str, Any]
Handler = Callable[..., Awaitable[Any]]

_DEPENDENCY_RETRY_S = 5
_ABANDON_S = 5.0
_DOWNLOAD_URL_TTL_S = 300


def create_ingress_app(
    platform: Platform, hub: StreamHub, *, backend: str, chat: bool = True
) -> Quart:
    """The ingress app; with ``chat=False`` only its health routes (a processor's)."""
    app = _new_app(backend)
    app.config["MAX_CONTENT_LENGTH"] = platform.settings.max_body_bytes
    routes = _IngressRoutes(platform, hub)
    routes.register_health(app)
    if chat:
        routes.register_chat(app)
        # Uploads stream into storage; Quart alone would buffer them whole.
        app.asgi_app = StreamedBodies(  # type: ignore[method-assign]
            app.asgi_app, is_multipart_post("/sse/chat")
        )
    return app


def _new_app(backend: str) -> Quart:
    if backend == "trio":
        from quart_trio import QuartTrio

        return QuartTrio("kdcube.ingress")
    return Quart("kdcube.ingress")


class _IngressRoutes:
    def __init__(self, platform: Platform, hub: StreamHub) -> None:
        self.platform = platform
        self.settings = platform.settings
        self.bus = platform.bus
        self.hub = hub
        gateway = platform.gateway
        breakers = Breakers(gateway.breaker_store, gateway.board.current)
        backpressure = Backpressure(
            platform.bus.queue,
            platform.bus.state,
            lambda: gateway.board.current().backpressure,
        )
        self.guard = Guard(
            gateway,
            backpressure,
            breakers,
            platform.bus.relay,
            platform.bus.state,
            tenant=platform.settings.tenant,
            project=platform.settings.project,
        )
        self.store = GuardedStore(platform.store, breakers["postgres"])
        self.admin = AdminRoutes(
            self._identify,
            gateway.board,
            GatewayCodec(),
            breakers,
            platform.bundles,
            RegistryCodec(registry_base(platform.settings)),
        )
        self.layout = Layout(platform.settings.tenant, platform.settings.project)
        self.cookie_names = TokenCookies.from_settings(platform.settings)

    def register_health(self, app: Quart) -> None:
        app.add_url_rule("/health", view_func=self.health, methods=["GET"])
        app.add_url_rule("/ready", view_func=self.ready, methods=["GET"])
        app.register_error_handler(ApiError, _api_error)
        app.register_error_handler(HTTPException, _http_error)
        app.register_error_handler(BusUnavailable, self._bus_down)
        app.register_error_handler(StoreUnavailable, self._store_down)
        app.register_error_handler(MalformedMultipart, _malformed_body)
        app.register_error_handler(CircuitOpen, _circuit_open)
        app.register_error_handler(Exception, _unexpected_error)
        app.after_request(_close_after_refused_body)

    async def _bus_down(
        self, error: BusUnavailable
    ) -> tuple[Json, int, dict[str, str]]:
        return self._dependency_down(self.platform.bus_name, error)

    async def _store_down(
        self, error: StoreUnavailable
    ) -> tuple[Json, int, dict[str, str]]:
        return self._dependency_down(self.platform.store_name, error)

    def _dependency_down(
        self, name: str, error: Exception
    ) -> tuple[Json, int, dict[str, str]]:
        # Readiness says so at once; the dependency watcher clears it when
        # the service answers again.
        self.platform.health.down.add(name)
        log.warning("dependency.request_failed", dependency=name, error=str(error))
        refusal = ApiError(
            503,
            "dependency_unavailable",
            f"{name} is unreachable; retry shortly.",
            retry_after=_DEPENDENCY_RETRY_S,
        )
        return refusal.body(), refusal.status, refusal.headers()

    def register_chat(self, app: Quart) -> None:
        self.admin.register(app)
        app.add_url_rule(
            "/sse/stream", view_func=self._needs_redis(self.stream), methods=["GET"]
        )
        app.add_url_rule(
            "/sse/chat", view_func=self._needs_redis(self.chat), methods=["POST"]
        )
        app.add_url_rule(
            "/sse/cancel", view_func=self._needs_redis(self.cancel), methods=["POST"]
        )
        app.add_url_rule(
            "/sse/conv_status.get",
            view_func=self._needs_redis(self.conv_status),
            methods=["POST"],
        )
        app.add_url_rule(
            "/api/conversations",
            view_func=self._needs_redis(self.list_conversations),
            methods=["GET"],
        )
        app.add_url_rule(
            "/api/conversations/<conversation_id>",
            view_func=self._needs_redis(self.get_conversation),
            methods=["GET"],
        )
        app.add_url_rule(
            "/api/conversations/<conversation_id>",
            endpoint="delete_conversation",
            view_func=self._needs_redis(self.delete_conversation),
            methods=["DELETE"],
        )
        app.add_url_rule(
            "/api/conversations/<conversation_id>/turns/<turn_id>/attachments/<path:name>",
            view_func=self._needs_redis(self.download_attachment),
            methods=["GET"],
        )
        app.add_url_rule(
            "/api/conversations/<conversation_id>/turns/<turn_id>/artifacts/<path:name>",
            view_func=self._needs_redis(self.download_artifact),
            methods=["GET"],
        )

    def _needs_redis(self, handler: Handler) -> Handler:
        """Run ``handler`` under the Redis breaker: while Redis is known to
        be down, requests are refused at once instead of each timing out."""

        @functools.wraps(handler)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            async with self.guard.redis():
                return await handler(*args, **kwargs)

        return guarded

    async def health(self) -> tuple[Json, int]:
        return {"status": "ok"}, 200

    async def ready(self) -> tuple[Json, int]:
        status, body = self.platform.health.readiness()
        return body, status

    async def _identify(self) -> Identity:
        return await requests.identify(
            request, self.platform.authenticator, self.cookie_names
        )

    async def _session_of(self, identity: Identity) -> str:
        return await self.bus.state.session_for(
            identity.session_key, ttl_s=self.settings.session_ttl_s
        )

    async def _reader(self) -> Identity:
        """The caller of a request that reads or controls, within its rate limit."""
        identity = await self._identify()
        await self.guard.admit_read(identity, await self._session_of(identity))
        return identity

    def _refuse_when_draining(self) -> None:
        if self.platform.health.draining:
            raise draining()

    async def stream(self) -> Response:
        self._refuse_when_draining()
        await self.guard.admit_stream(self.hub.connections)
        identity = await self._identify()
        stream_id = requests.client_id(
            request.args.get("stream_id"), "stream_id", required=True
        )
        assert stream_id is not None
        resume_from = requests.last_event_id(request)
        if resume_from is not None:
            try:
                parse_event_id(resume_from)
            except ValueError:
                raise bad_request(
                    "bad_last_event_id",
                    "Last-Event-ID must be an event id this server sent.",
                ) from None

        session_id = await self._session_of(identity)
        cursor = resume_from or await self.bus.relay.position(session_id)
        ready = {
            "session_id": session_id,
            "stream_id": stream_id,
            "user_type": identity.user_type.value,
            "tenant": self.settings.tenant,
            "project": self.settings.project,
        }
        start = StreamStart(session_id, stream_id, cursor, ready)
        response = Response(self.hub.frames(start), headers=sse.HEADERS)
        response.timeout = None
        return response

    async def chat(self) -> tuple[Json, int]:
        self._refuse_when_draining()
        identity = await self._identify()
        stream_id = requests.client_id(
            request.args.get("stream_id"), "stream_id", required=False
        )
        caller = Caller(identity, await self._session_of(identity), stream_id)
        await self.guard.admit_chat(identity, caller.session_id, stream_id)
        if request.mimetype == "multipart/form-data":
            return await self._chat_with_files(caller)

        submission = parse_submission(await requests.json_body(request))
        checked = self._check_submission(submission)
        return await self._submit(caller, checked, turn_id=new_id())

    async def _chat_with_files(self, caller: Caller) -> tuple[Json, int]:
        """A submission whose files are stored and scanned before the turn is
        recorded, so a refused file leaves no turn behind."""
        parts = open_parts(request, max_message_bytes=MAX_MESSAGE_BYTES)
        raw = await parts.submission(self.settings.max_body_bytes)
        checked = self._check_submission(parse_submission(requests.parse_json(raw)))
        identity = caller.identity
        if checked.requested_conversation is not None:
            await self._check_owner(identity, checked.requested_conversation)

        turn_id = new_id()
        prefix = self.layout.turn_prefix(
            "attachments", identity.user_id, checked.conversation_id, turn_id
        )
        intake = Intake(
            self.platform.storage,
            self.platform.scanner,
            prefix,
            budget=MAX_MESSAGE_BYTES,
            breaker=self.guard.breakers["clamd"],
        )
        intake.charge(len(checked.prompt.encode()), "The prompt")
        try:
            async for file_name, chunks in parts.files():
                await intake.take(file_name, chunks)
            return await self._submit(
                caller, checked, turn_id=turn_id, files=intake.files
            )
        except BaseException:
            if intake.files:
                await intake.discard()
            raise

    def _check_submission(self, submission: Submission) -> CheckedSubmission:
        self._check_project(submission.tenant, submission.project)
        prompt = submission.prompt()
        if len(prompt) > self.settings.max_prompt_chars:
            raise bad_request(
                "input_too_long",
                f"The prompt has {len(prompt)} characters; the limit is "
                f"{self.settings.max_prompt_chars}.",
            )
        spec = self.platform.registry.resolve(submission.bundle_id)
        if spec is None:
            raise bad_request("unknown_bundle", f"No bundle {submission.bundle_id!r}.")

        requested = requests.client_id(
            submission.conversation_id, "conversation_id", required=False
        )
        return CheckedSubmission(
            submission=submission,
            prompt=prompt,
            bundle_id=spec.id,
            requested_conversation=requested,
            conversation_id=requested or new_id(),
        )

    async def _check_owner(self, identity: Identity, conversation_id: str) -> None:
        try:
            await self.store.unfinished_turns(identity.user_id, conversation_id)
        except ConversationNotFound:
            raise not_found("conversation") from None

    async def _submit(
        self,
        caller: Caller,
        checked: CheckedSubmission,
        *,
        turn_id: str,
        files: Sequence[StoredFile] = (),
    ) -> tuple[Json, int]:
        identity, session_id, stream_id = caller
        submission = checked.submission
        conversation_id = checked.conversation_id
        prompt = checked.prompt
        attachments = [stored.record() for stored in files]
        new = NewTurn(
            user_id=identity.user_id,
            conversation_id=conversation_id,
            create_conversation=checked.requested_conversation is None,
            bundle_id=checked.bundle_id,
            turn_id=turn_id,
            request_id=new_id(),
            message_kind=submission.message_kind,
            prompt=prompt,
            attachments=tuple(attachments),
        )
        try:
            result = await self.store.submit_turn(new)
        except ConversationNotFound:
            raise not_found("conversation") from None

        steering = result.busy and submission.message_kind == "steer"
        if steering:
            earlier = await self.store.unfinished_turns(
                identity.user_id, conversation_id
            )
            await self._cancel_turns([t for t in earlier if t != new.turn_id])

        if not result.busy:
            # A turn may wait for a free processor: say at once that the
            # conversation has work again. A follow-up is announced by the
            # processor, after the closing status of the turn before it.
            await self._publish_status(
                identity,
                session_id,
                stream_id,
                conversation_id=conversation_id,
                turn_id=new.turn_id,
                state="in_progress",
                request_id=new.request_id,
            )

        job = TurnJob(
            turn_id=new.turn_id,
            conversation_id=conversation_id,
            session_id=session_id,
            stream_id=stream_id,
            request_id=new.request_id,
            tenant=self.settings.tenant,
            project=self.settings.project,
            user_id=identity.user_id,
            user_type=identity.user_type.value,
            bundle_id=checked.bundle_id,
            prompt=prompt,
            message_kind=submission.message_kind,
            enqueued_at_ms=now_ms(),
            announced=not result.busy,
            attachments=attachments,
        )
        await self._enqueue(job)
        return {
            "status": _ack_status(result.busy, submission.message_kind),
            "conversation_id": conversation_id,
            "turn_id": new.turn_id,
            "session_id": session_id,
            "conversation_created": result.conversation_created,
        }, 200

    async def cancel(self) -> tuple[Json, int]:
        identity = await self._reader()
        body = await requests.json_body(request)
        conversation_id = _required_field(body, "conversation_id")
        turn_id = body.get("turn_id") if isinstance(body, dict) else None
        try:
            unfinished = await self.store.unfinished_turns(
                identity.user_id, conversation_id
            )
        except ConversationNotFound:
            raise not_found("conversation") from None

        if turn_id is not None:
            if turn_id not in unfinished:
                raise ApiError(
                    409, "turn_not_active", "That turn is not queued or running."
                )
            unfinished = [turn_id]
        await self._cancel_turns(unfinished)
        return {"status": "cancel_requested"}, 202

    async def conv_status(self) -> tuple[Json, int]:
        identity = await self._identify()
        session_id = await self._session_of(identity)
        await self.guard.admit_read(identity, session_id)
        stream_id = requests.client_id(
            request.args.get("stream_id"), "stream_id", required=False
        )
        conversation_id = _required_field(
            await requests.json_body(request), "conversation_id"
        )
        try:
            summary = (
                await self.store.conversation(identity.user_id, conversation_id)
            ).summary
        except ConversationNotFound:
            raise not_found("conversation") from None

        updated_at = events.iso(summary.updated_at)
        await self._publish_status(
            identity,
            session_id,
            stream_id,
            conversation_id=conversation_id,
            turn_id=summary.current_turn_id,
            state=summary.state,
            updated_at=updated_at,
        )
        return {
            "conversation_id": conversation_id,
            "state": summary.state,
            "current_turn_id": summary.current_turn_id,
            "updated_at": updated_at,
        }, 200

    async def list_conversations(self) -> tuple[Json, int]:
        identity = await self._reader()
        found = await self.store.conversations(identity.user_id)
        return {"conversations": [c.to_json() for c in found]}, 200

    async def get_conversation(self, conversation_id: str) -> tuple[Json, int]:
        identity = await self._reader()
        try:
            detail = await self.store.conversation(identity.user_id, conversation_id)
        except ConversationNotFound:
            raise not_found("conversation") from None
        return detail.to_json(), 200

    async def delete_conversation(self, conversation_id: str) -> tuple[Json, int]:
        identity = await self._reader()
        outcome = await self.store.delete_conversation(
            identity.user_id, conversation_id
        )
        if outcome is DeleteOutcome.NOT_FOUND:
            raise not_found("conversation")
        if outcome is DeleteOutcome.BUSY:
            raise ApiError(
                409,
                "conversation_busy",
                "A turn is queued or running; cancel it first.",
            )
        return {"status": "deleted", "conversation_id": conversation_id}, 200

    async def download_attachment(
        self, conversation_id: str, turn_id: str, name: str
    ) -> Response:
        return await self._download("attachment", conversation_id, turn_id, name)

    async def download_artifact(
        self, conversation_id: str, turn_id: str, name: str
    ) -> Response:
        return await self._download("artifact", conversation_id, turn_id, name)

    async def _download(
        self, kind: FileKind, conversation_id: str, turn_id: str, name: str
    ) -> Response:
        """A file of the caller's turn: one they sent, or one the bundle made."""
        identity = await self._reader()
        try:
            detail = await self.store.conversation(identity.user_id, conversation_id)
        except ConversationNotFound:
            raise not_found(kind) from None
        record = _file_record(detail.turns, turn_id, kind, name)
        if record is None:
            raise not_found(kind)

        key = _file_key(self.layout, kind, identity.user_id, conversation_id, turn_id)
        key += str(record["name"])
        url = await self.platform.storage.download_url(
            key, expires_s=_DOWNLOAD_URL_TTL_S
        )
        if url is not None:
            return Response("", status=302, headers={"Location": url})
        return await attachment_response(self.platform.storage, key, record)

    async def _enqueue(self, job: TurnJob) -> None:
        """Queue the recorded turn; if that fails, end it before refusing.

        Otherwise the store would keep a queued turn that no processor will
        ever see, and the conversation would look busy forever.
        """
        try:
            await self.bus.queue.enqueue(job)
        except BusUnavailable:
            ending = Ending.failed("enqueue_failed", "The turn could not be queued.")
            emitter = emitter_for(self.bus.relay, job)
            with anyio.CancelScope(shield=True), anyio.move_on_after(_ABANDON_S):
                await end_turn(
                    self.store,
                    emitter,
                    job,
                    ending,
                    final_status=job.announced,
                    counts=self.bus.state,
                )
            raise

    async def _cancel_turns(self, turn_ids: list[str]) -> None:
        """Drop waiting turns here; running ones are stopped by their processor."""
        for turn_id in turn_ids:
            result = await self.bus.queue.cancel(turn_id)
            if result.outcome is CancelOutcome.DROPPED and result.job is not None:
                emitter = emitter_for(self.bus.relay, result.job)
                await end_turn(
                    self.store,
                    emitter,
                    result.job,
                    Ending.cancelled(),
                    final_status=result.job.announced,
                    counts=self.bus.state,
                )

    async def _publish_status(
        self,
        identity: Identity,
        session_id: str,
        stream_id: str | None,
        *,
        conversation_id: str,
        turn_id: str | None,
        state: str,
        updated_at: str | None = None,
        request_id: str | None = None,
    ) -> None:
        address = TurnAddress(
            tenant=self.settings.tenant,
            project=self.settings.project,
            user_id=identity.user_id,
            user_type=identity.user_type.value,
            session_id=session_id,
            conversation_id=conversation_id,
            turn_id=turn_id or "",
            request_id=request_id or new_id(),
        )
        envelope = events.conv_status(
            address, state, current_turn_id=turn_id, updated_at=updated_at
        )
        await self.bus.relay.publish(
            session_id, Route.CONV_STATUS, sse.dumps(envelope), stream_id=stream_id
        )

    def _check_project(self, tenant: str | None, project: str | None) -> None:
        if tenant not in (None, self.settings.tenant) or project not in (
            None,
            self.settings.project,
        ):
            raise bad_request(
                "invalid_request",
                f"This server serves tenant {self.settings.tenant!r}, "
                f"project {self.settings.project!r}.",
            )


FileKind = Literal["attachment", "artifact"]


def _file_record(
    turns: list[TurnRecord], turn_id: str, kind: FileKind, name: str
) -> dict[str, Any] | None:
    for turn in turns:
        if turn.turn_id != turn_id:
            continue
        records = turn.attachments if kind == "attachment" else turn.artifacts
        for record in records:
            if record.get("name") == name:
                return record
    return None


def _file_key(
    layout: Layout, kind: FileKind, owner: str, conversation_id: str, turn_id: str
) -> str:
    """Where the processor (artifacts) or the ingress (attachments) stored it."""
    if kind == "attachment":
        return layout.turn_prefix("attachments", owner, conversation_id, turn_id)
    return layout.artifacts_prefix(owner, conversation_id, turn_id)


class Caller(NamedTuple):
    identity: Identity
    session_id: str
    stream_id: str | None


def _ack_status(busy: bool, message_kind: str) -> str:
    if not busy:
        return "processing_started"
    return "steer_accepted" if message_kind == "steer" else "followup_accepted"


def _required_field(body: Any, name: str) -> str:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value:
        raise bad_request(f"missing_{name}", f"The body must name a {name}.")
    return value


async def _close_after_refused_body(response: Response) -> Response:
    """Close the connection when the answer goes out before the whole body
    came in (a refusal, or a route that reads no body).

    Hypercorn's Trio worker then leaves that keep-alive connection waiting
    for the rest of the body, and the client's next request on it is never
    answered. Closing costs one reconnect and is always correct.
    """
    if _has_body(request) and (
        response.status_code >= 400 or not _body_received(request)
    ):
        response.headers["Connection"] = "close"
    return response


def _body_received(incoming: Any) -> bool:
    # Quart keeps no public flag for this; its Body sets ``_complete`` once
    # the last byte arrived. Without it, assume not: closing is the safe side.
    complete = getattr(incoming.body, "_complete", None)
    return complete is not None and bool(complete.is_set())


def _has_body(incoming: Any) -> bool:
    headers = incoming.headers
    if gate_of(incoming.scope) is not None or "Transfer-Encoding" in headers:
        return True
    length = headers.get("Content-Length", "0")
    return not length.isdigit() or int(length) > 0


async def _circuit_open(error: CircuitOpen) -> tuple[Json, int, dict[str, str]]:
    refusal = circuit_open_error(error)
    return refusal.body(), refusal.status, refusal.headers()


async def _malformed_body(error: MalformedMultipart) -> tuple[Json, int]:
    return bad_request("invalid_request", str(error)).body(), 400


async def _api_error(error: ApiError) -> tuple[Json, int, dict[str, str]]:
    return error.body(), error.status, error.headers()


async def _http_error(error: HTTPException) -> tuple[Json, int]:
    code = (error.name or "error").lower().replace(" ", "_")
    return {"error": code, "detail": error.description or code}, error.code or 500


async def _unexpected_error(error: Exception) -> tuple[Json, int]:
    log.error("http.unhandled", path=request.path, exc_info=error)
    return {"error": "internal_error", "detail": "The server failed; try again."}, 500
