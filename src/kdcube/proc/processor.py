"""Claims turns from the queue and runs each in its own cancel scope.

Ownership: ``serve`` opens the turn task group, so every turn belongs to the
processor and ends before ``serve`` returns. Client cancel, the idle and
wall-time watchdogs, lease loss and shutdown all stop a turn the same way: by
cancelling its scope with a reason. Ending a turn (store, terminal event,
final status, ack) runs shielded under a short deadline so it happens even
when the turn was cancelled.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import anyio
import httpx
import structlog
from anyio.abc import TaskGroup, TaskStatus

from kdcube.bundles import BundleRegistry, LoadedBundle
from kdcube.bundles.live import LoadedBundles
from kdcube.bus import Bus, BusError, Claim, LeaseLost, TurnJob
from kdcube.bus.board import Board
from kdcube.exec import Executor, Executors
from kdcube.metrics.tallies import observe_queue_wait, observe_turn_duration
from kdcube.proc.asyncio_bundles import AsyncioBundles
from kdcube.proc.emitter import SealedEmitter, TurnEmitter
from kdcube.proc.ending import Ending, StopReason, emitter_for, end_turn
from kdcube.proc.turn_exec import TurnExecutor
from kdcube.runtime.task_protection import TaskProtection
from kdcube.sdk import (
    ArtifactSaver,
    Attachment,
    AttachmentOpener,
    PastTurn,
    TurnContext,
)
from kdcube.storage import Storage
from kdcube.storage.layout import Layout, safe_file_name
from kdcube.store import Store, StoreUnavailable
from kdcube.wire.events import now_ms
from kdcube.wire.ids import new_id

log = structlog.get_logger("kdcube.proc")

# Ending a turn may wait out a short database or relay outage; past this the
# turn is left to its lease, and whoever claims it next ends it.
_SETTLE_S = 20.0
_BUS_RETRY_S = 1.0
_RELOAD_WAIT_S = 150.0
# How soon a first turn gets its task protected, and an idle task released.
_PROTECTION_CHECK_S = 1.0
"""How long a turn waits for its bundle to load (a git fetch has 120 s)."""


@dataclass(frozen=True, slots=True)
class ProcessorOptions:
    concurrency: int = 32
    lease_s: float = 10.0
    idle_timeout_s: float = 600.0
    wall_timeout_s: float = 2400.0
    drain_timeout_s: float = 30.0
    heartbeat_s: float = 5.0
    cancel_grace_s: float = 5.0
    """How long a stopped bundle may take to unwind before its turn ends
    without it (its slot is freed; the bundle finishes on its own)."""
    ecs_agent_uri: str | None = None
    """On ECS, the task's agent (``ECS_AGENT_URI``): the task is protected
    from scale-in while turns run here."""


@dataclass(slots=True)
class _BundleCall:
    """One run of a bundle for a turn, and how it ended."""

    bundle: LoadedBundle
    context: TurnContext
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    ending: Ending | None = None
    """None while it runs, and when it was cancelled."""

    @property
    def emit(self) -> SealedEmitter:
        assert isinstance(self.context.emit, SealedEmitter)
        return self.context.emit


@dataclass(slots=True)
class _RunningTurn:
    claim: Claim
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    reason: StopReason | None = None
    began: bool = False
    """Whether ``in_progress`` went out for it, here or on an earlier claim."""
    leave_to_lease: bool = False
    """The database was out of reach: do not ack, let the turn be redelivered."""

    def stop(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
            self.scope.cancel()


class Processor:
    _bundle_calls: TaskGroup
    """Where bundles run, beside their turns (see ``_call_bundle``)."""

    def __init__(
        self,
        bus: Bus,
        store: Store,
        bundles: LoadedBundles | Mapping[str, LoadedBundle],
        options: ProcessorOptions,
        *,
        storage: Storage | None = None,
        registry: Board[BundleRegistry] | None = None,
        executors: Executors | None = None,
    ) -> None:
        self._bus = bus
        self._store = store
        self._storage = storage
        self._asyncio = AsyncioBundles()
        self._bundles = (
            bundles
            if isinstance(bundles, LoadedBundles)
            else LoadedBundles.fixed(bundles)
        )
        self._registry = registry
        self._executors = executors
        self._options = options
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"
        self._running: dict[str, _RunningTurn] = {}
        self._turn_ended = anyio.Event()
        self._slots = anyio.Semaphore(options.concurrency)
        self._intake = anyio.CancelScope()
        self._draining = False
        self.finished = anyio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def begin_drain(self) -> None:
        """Stop claiming; running turns get ``drain_timeout_s`` to finish."""
        self._draining = True
        self._intake.cancel()

    async def serve(
        self, *, task_status: TaskStatus[Processor] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self._serve(task_status)
        finally:
            self.finished.set()

    async def _serve(self, task_status: TaskStatus[Processor]) -> None:
        async with anyio.create_task_group() as helpers:
            self._asyncio.host_in(helpers)
            await helpers.start(self._listen_for_cancels)
            if self._registry is not None:
                helpers.start_soon(self._follow_registry, self._registry)
            helpers.start_soon(self._beat_forever)
            if self._options.ecs_agent_uri is not None:
                helpers.start_soon(self._guard_scale_in, self._options.ecs_agent_uri)
            # Bundle calls live beside the turns, not inside them: a bundle
            # that ignores cancellation finishes here after its turn ended.
            async with anyio.create_task_group() as self._bundle_calls:
                async with anyio.create_task_group() as turns:
                    task_status.started(self)
                    with self._intake:
                        await self._claim_forever(turns)
                    await self._finish_in_flight()

            if not self._bus.durable:
                await self._interrupt_waiting()
            helpers.cancel_scope.cancel()

    async def _follow_registry(self, registry: Board[BundleRegistry]) -> None:
        """Reload bundles whenever the live registry changes: new turns get the
        new code, running ones keep what they started with."""
        version = registry.version
        while True:
            await registry.wait_version(version + 1)
            version = registry.version
            try:
                await self._bundles.reload(registry.current(), version=version)
            except Exception as exc:
                # A registry this processor cannot load must not stop it:
                # it keeps serving the bundles it has.
                log.error("bundles.reload_failed", version=version, exc_info=exc)
                continue
            log.info("bundles.reloaded", version=version, **self._bundles.describe())

    async def _claim_forever(self, turns: TaskGroup) -> None:
        while True:
            await self._slots.acquire()
            try:
                claim = await self._claim()
            except BaseException:
                self._slots.release()
                raise
            # Registered before the task starts, so a drain that begins right
            # now still sees this turn as running and applies its deadline.
            turn = self._running[claim.job.turn_id] = _RunningTurn(claim)
            turns.start_soon(self._run_turn, turn)
            if claim.deliveries == 1:
                waited_s = (now_ms() - claim.job.enqueued_at_ms) / 1000
                turns.start_soon(observe_queue_wait, self._bus.state, waited_s)

    async def _claim(self) -> Claim:
        while True:
            try:
                return await self._bus.queue.claim(
                    self.instance, lease_s=self._options.lease_s
                )
            except BusError as exc:
                log.warning("queue.claim_failed", error=str(exc))
                await anyio.sleep(_BUS_RETRY_S)

    async def _finish_in_flight(self) -> None:
        with anyio.move_on_after(self._options.drain_timeout_s):
            while self._running:
                await self._turn_ended.wait()

        for turn in list(self._running.values()):
            turn.stop(StopReason.SHUTDOWN)

    async def _listen_for_cancels(self, *, task_status: TaskStatus[None]) -> None:
        async with self._bus.queue.watch_cancels() as requests:
            task_status.started()
            async for turn_id in requests:
                turn = self._running.get(turn_id)
                if turn is not None:
                    turn.stop(StopReason.CANCELLED)

    async def _guard_scale_in(self, agent_uri: str) -> None:
        """Keep the ECS task protected from scale-in while turns run, and
        released once none do (each update is bounded and never raises)."""
        async with httpx.AsyncClient() as http:
            protection = TaskProtection(agent_uri, http)
            try:
                while True:
                    await protection.update(self.in_flight > 0)
                    await anyio.sleep(_PROTECTION_CHECK_S)
            finally:
                with anyio.CancelScope(shield=True):
                    await protection.update(False)

    async def _beat_forever(self) -> None:
        while True:
            info = {
                "capacity": self._options.concurrency,
                "in_flight": self.in_flight,
                "draining": self._draining,
            }
            try:
                await self._bus.state.beat(
                    "proc", self.instance, info, ttl_s=self._options.heartbeat_s * 3
                )
            except BusError as exc:
                log.warning("proc.heartbeat_failed", error=str(exc))
            await anyio.sleep(self._options.heartbeat_s)

    async def _run_turn(self, turn: _RunningTurn) -> None:
        job = turn.claim.job
        emitter = emitter_for(self._bus.relay, job)
        started_at = anyio.current_time()
        ending: Ending | None = Ending.interrupted("server_shutdown")
        # The lease is kept from claim to ack: a turn that waits on the store
        # longer than a lease must not be handed to someone else meanwhile.
        async with anyio.create_task_group() as keeper:
            keeper.start_soon(self._keep_lease, turn)
            try:
                ending = await self._execute(turn, emitter)
            except StoreUnavailable as exc:
                log.warning("turn.deferred", turn_id=job.turn_id, error=str(exc))
                turn.leave_to_lease = True
                ending = None
            except Exception as exc:
                # A Redis outage while the turn is being started lands here
                # too: the turn fails as an internal error rather than
                # waiting for the bus to come back, even when its bundle
                # never ran.
                log.error("turn.crashed", turn_id=job.turn_id, exc_info=exc)
                ending = Ending.failed(
                    "internal_error", "The server failed to run this turn."
                )
            finally:
                with anyio.CancelScope(shield=True) as cleanup:
                    cleanup.deadline = anyio.current_time() + _SETTLE_S
                    await self._settle(turn, emitter, ending)
                keeper.cancel_scope.cancel()
                self._forget(turn)
                duration_s = anyio.current_time() - started_at
                log.info(
                    "turn.finished",
                    turn_id=job.turn_id,
                    bundle_id=job.bundle_id,
                    outcome=ending.state.value if ending else "deferred",
                    reason=turn.reason,
                    duration_ms=round(duration_s * 1000, 1),
                )
        if ending is not None:
            # Outside the keeper's cancelled scope, once the slot is free.
            await observe_turn_duration(self._bus.state, duration_s)

    def _forget(self, turn: _RunningTurn) -> None:
        turn_id = turn.claim.job.turn_id
        if self._running.get(turn_id) is turn:
            del self._running[turn_id]
        self._slots.release()
        self._turn_ended.set()
        self._turn_ended = anyio.Event()

    async def _execute(self, turn: _RunningTurn, emitter: TurnEmitter) -> Ending:
        """Run the turn to its ending."""
        claim, job = turn.claim, turn.claim.job
        bundle = await self._bundle_for(job)
        if claim.started:
            taken_over = True
        elif await self._bus.queue.cancel_requested(claim):
            return Ending.cancelled()
        else:
            # A turn the store no longer holds as queued either ended
            # elsewhere, or was started by a processor that died before it
            # could mark the queue: both are a takeover.
            taken_over = not await self._store.start_turn(job.turn_id)

        turn.began = True
        if taken_over:
            settled = await self._take_over(job, bundle, emitter)
            if settled is not None:
                return settled
        else:
            await self._bus.queue.mark_started(claim)
            if not job.announced:
                await emitter.status("in_progress")

        await emitter.start(job.bundle_id)
        if bundle is None:
            return Ending.failed(
                "bundle_error", f"Bundle {job.bundle_id!r} is not loaded."
            )

        if turn.reason is not None:
            return Ending.stopped(turn.reason)
        with self._bundles.hold(bundle):
            ending = await self._run_bundle(turn, bundle, emitter)
        if turn.reason is not None:
            return Ending.stopped(turn.reason)
        if ending is None:
            return Ending.stopped(StopReason.WALL)
        return ending

    async def _bundle_for(self, job: TurnJob) -> LoadedBundle | None:
        """The turn's bundle; one the live registry has but this processor has
        not loaded yet (a reload under way, a git fetch) is waited for."""
        bundle = self._bundles.get(job.bundle_id)
        registry = self._registry
        if bundle is not None or registry is None:
            return bundle
        if registry.current().resolve(job.bundle_id) is None:
            return None
        with anyio.move_on_after(_RELOAD_WAIT_S):
            await self._bundles.wait_loaded(registry.version)
        return self._bundles.get(job.bundle_id)

    async def _take_over(
        self, job: TurnJob, bundle: LoadedBundle | None, emitter: TurnEmitter
    ) -> Ending | None:
        """The ending of a turn another processor started; None when it is
        to be run again here."""
        earlier = await self._store.turn_outcome(job.turn_id)
        if earlier is not None:
            # It ended before its processor died: announce that ending.
            return Ending.from_outcome(earlier)
        if not await self._announce_rerun(job.turn_id, bundle, emitter):
            return Ending.interrupted("worker_lost_after_start")
        return None

    @staticmethod
    async def _announce_rerun(
        turn_id: str, bundle: LoadedBundle | None, emitter: TurnEmitter
    ) -> bool:
        """A started turn whose processor died reruns once, if its bundle says
        that is safe. The rerun notice is published under a once-key, which
        doubles as the record that the one rerun was taken."""
        if bundle is None or not bundle.rerun_safe:
            return False
        return await emitter.service(
            "turn.rerun",
            "The turn restarts after a server failure.",
            once=f"{turn_id}:rerun",
        )

    async def _history(self, job: TurnJob) -> list[PastTurn]:
        earlier = await self._store.history(
            job.user_id, job.conversation_id, before_turn_id=job.turn_id
        )
        return [
            PastTurn(turn.turn_id, turn.prompt, turn.final_answer, turn.state.value)
            for turn in earlier
        ]

    def _artifact_saver(self, job: TurnJob, emitter: TurnEmitter) -> ArtifactSaver:
        prefix = Layout(job.tenant, job.project).artifacts_prefix(
            job.user_id, job.conversation_id, job.turn_id
        )
        storage, store = self._storage, self._store

        async def save(name: str, data: bytes, mime: str) -> Attachment:
            if storage is None:
                raise RuntimeError("this processor has no storage for artifacts")
            safe = safe_file_name(name)
            await storage.put(prefix + safe, data)
            record = {"name": safe, "mime": mime, "size": len(data)}
            await store.add_artifact(job.turn_id, record)
            await emitter.step("artifact", status="completed", title=safe, data=record)
            return Attachment(safe, mime, len(data))

        return save

    def _turn_executor(
        self, job: TurnJob, bundle: LoadedBundle, saver: ArtifactSaver
    ) -> Executor | None:
        """The executor the bundle asked for (or the deployment's), keeping
        each run's record and its ``out/`` files for this turn."""
        chosen = None
        if self._executors is not None:
            chosen = self._executors.for_mode(bundle.spec.exec_mode)
        if chosen is None:
            return None
        mode, executor = chosen
        records = Layout(job.tenant, job.project).turn_prefix(
            "executions", job.user_id, job.conversation_id, job.turn_id
        )
        return TurnExecutor(
            executor,
            mode=mode,
            turn_id=job.turn_id,
            bundle_id=job.bundle_id,
            storage=self._storage,
            record_prefix=records,
            save_artifact=saver,
        )

    def _attachment_opener(self, job: TurnJob) -> AttachmentOpener:
        layout = Layout(job.tenant, job.project)
        prefix = layout.turn_prefix(
            "attachments", job.user_id, job.conversation_id, job.turn_id
        )
        storage = self._storage

        def open_attachment(name: str) -> AsyncIterator[bytes]:
            if storage is None:
                raise LookupError("this processor has no storage for attachments")
            return storage.get(prefix + name)

        return open_attachment

    async def _run_bundle(
        self, turn: _RunningTurn, bundle: LoadedBundle, emitter: TurnEmitter
    ) -> Ending | None:
        """The bundle under its watchdogs; None when the turn's scope was cancelled."""
        job = turn.claim.job
        saver = self._artifact_saver(job, emitter)
        context = TurnContext(
            tenant=job.tenant,
            project=job.project,
            user_id=job.user_id,
            user_type=job.user_type,
            session_id=job.session_id,
            conversation_id=job.conversation_id,
            turn_id=job.turn_id,
            bundle_id=job.bundle_id,
            prompt=job.prompt,
            config=bundle.config,
            emit=emitter,
            attachments=[
                Attachment(str(a["name"]), str(a["mime"]), int(a["size"]))
                for a in job.attachments
            ],
            opener=self._attachment_opener(job),
            exec=self._turn_executor(job, bundle, saver),
            history=await self._history(job),
            saver=saver,
        )
        sealable = SealedEmitter(emitter)
        call = _BundleCall(bundle, dataclasses.replace(context, emit=sealable))
        self._bundle_calls.start_soon(self._call_bundle, call)
        with turn.scope:
            turn.scope.deadline = anyio.current_time() + self._options.wall_timeout_s
            async with anyio.create_task_group() as guards:
                guards.start_soon(self._watch_idle, turn, emitter)
                try:
                    await call.done.wait()
                finally:
                    guards.cancel_scope.cancel()
        if not call.done.is_set():
            await self._stop_call(call, job)
        return call.ending

    async def _call_bundle(self, call: _BundleCall) -> None:
        """Run the bundle in a task of its own, so that a bundle that ignores
        cancellation cannot hold its turn (or its slot) past the grace."""
        job_id = call.context.turn_id
        try:
            with call.scope:
                if call.bundle.on_asyncio:
                    answer = await self._asyncio.run(call.bundle.run, call.context)
                else:
                    answer = await call.bundle.run(call.context)
                call.ending = Ending.completed(answer or "")
        except Exception as exc:
            log.error(
                "bundle.failed",
                turn_id=job_id,
                bundle_id=call.bundle.spec.id,
                exc_info=exc,
            )
            call.ending = Ending.failed(
                "bundle_error", "The assistant failed to answer."
            )
        finally:
            call.emit.seal()
            call.done.set()

    async def _stop_call(self, call: _BundleCall, job: TurnJob) -> None:
        call.scope.cancel()
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(self._options.cancel_grace_s),
        ):
            await call.done.wait()
        if not call.done.is_set():
            # The turn ends now; whatever the bundle still says is dropped.
            call.emit.seal()
            call.ending = None
            log.warning(
                "bundle.ignores_cancel",
                turn_id=job.turn_id,
                bundle_id=job.bundle_id,
                grace_s=self._options.cancel_grace_s,
            )

    async def _watch_idle(self, turn: _RunningTurn, emitter: TurnEmitter) -> None:
        while True:
            quiet_until = emitter.last_activity + self._options.idle_timeout_s
            now = anyio.current_time()
            if now >= quiet_until:
                turn.stop(StopReason.IDLE)
                return
            await anyio.sleep(quiet_until - now)

    async def _keep_lease(self, turn: _RunningTurn) -> None:
        while True:
            await anyio.sleep(self._options.lease_s / 3)
            try:
                await self._bus.queue.renew(turn.claim, lease_s=self._options.lease_s)
            except LeaseLost:
                turn.stop(StopReason.LEASE_LOST)
                return
            except BusError as exc:
                log.warning(
                    "queue.renew_failed", turn_id=turn.claim.job.turn_id, error=str(exc)
                )

    async def _settle(
        self, turn: _RunningTurn, emitter: TurnEmitter, ending: Ending | None
    ) -> None:
        """End the turn (see ``end_turn``), then release it in the queue."""
        if turn.reason is StopReason.LEASE_LOST:
            return  # Another processor owns the turn now; its events are its own.

        if ending is not None:
            ended = await end_turn(
                self._store,
                emitter,
                turn.claim.job,
                ending,
                final_status=turn.began,
                counts=self._bus.state,
            )
            turn.leave_to_lease = ended is None
        if turn.leave_to_lease:
            return  # Not acked: the lease runs out and the turn is claimed again.

        try:
            await self._bus.queue.ack(turn.claim)
        except BusError as exc:
            log.warning(
                "queue.ack_failed", turn_id=turn.claim.job.turn_id, error=str(exc)
            )

    async def _interrupt_waiting(self) -> None:
        """End turns still waiting in a queue that dies with this process."""
        with anyio.CancelScope(shield=True):
            for job in await self._bus.queue.take_waiting():
                emitter = emitter_for(self._bus.relay, job)
                ending = Ending.interrupted("server_shutdown")
                await end_turn(
                    self._store,
                    emitter,
                    job,
                    ending,
                    final_status=job.announced,
                    counts=self._bus.state,
                )
