"""Where the Redis bus keeps its data.

Every key is ``{prefix}:{tenant:project}:...``. Redis Cluster hashes only the
part between the first pair of braces, so all keys of one deployment live in
one slot and the multi-key Lua scripts stay legal on a cluster. The price is
that one deployment cannot spread over several cluster nodes; separate
deployments (tenants, projects) can.

Names taken from callers (sessions, roles, locks, counters) go last, so they
cannot collide with the fixed parts, and braces in them are harmless: only the
first pair counts as the hash tag.
"""

from __future__ import annotations

from dataclasses import dataclass


def _check_part(name: str, value: str) -> str:
    if not value or "{" in value or "}" in value:
        raise ValueError(
            f"{name} must be non-empty and free of braces, which Redis Cluster"
            f" reads as a hash tag; got {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The queue's fixed keys, in the order every queue script declares them."""

    jobs: str
    """Hash: turn id -> the job's JSON, as enqueued."""
    meta: str
    """Hash: turn id -> JSON of conversation, deliveries, started and lease."""
    waiting: str
    """Sorted set ordered by member: ``conversation \\x01 rank \\x01 turn``."""
    ready: str
    """List: conversations with a waiting turn and none claimed, oldest first."""
    claimed: str
    """Hash: conversation id -> its claimed turn id."""
    expiry: str
    """Sorted set: claimed turn id scored by lease expiry (server ms)."""
    handed: str
    """Hash: waiter id -> the turn claimed for it, until the lease ends."""
    waiters: str
    """List: ids of blocked claims, oldest first."""
    waiter: str
    """Hash: waiter id -> JSON of consumer, lease and registration deadline."""
    wakeups: str
    """Sorted set: waiter id scored by when its wait ends (server ms)."""
    counters: str
    """Hash: ``token`` (fencing tokens) and ``rank`` (waiting order)."""
    since: str
    """Sorted set: waiting turn id scored by when it became claimable (server ms)."""

    def all(self) -> list[str]:
        return [
            self.jobs,
            self.meta,
            self.waiting,
            self.ready,
            self.claimed,
            self.expiry,
            self.handed,
            self.waiters,
            self.waiter,
            self.wakeups,
            self.counters,
            self.since,
        ]


class KeyLayout:
    """Builds every key and channel name of one deployment."""

    def __init__(self, prefix: str, tenant: str, project: str) -> None:
        _check_part("prefix", prefix)
        _check_part("tenant", tenant)
        _check_part("project", project)
        self.root = f"{prefix}:{{{tenant}:{project}}}"
        self.queue = QueueKeys(
            *(
                self._key("q", name)
                for name in (
                    "jobs",
                    "meta",
                    "waiting",
                    "ready",
                    "claimed",
                    "expiry",
                    "handed",
                    "waiters",
                    "waiter",
                    "wakeups",
                    "counters",
                    "since",
                )
            )
        )

    def wake_prefix(self) -> str:
        """Per-waiter lists a blocked claim pops; the waiter id follows."""
        return self._key("q", "wake", "")

    def wake(self, waiter: str) -> str:
        return self.wake_prefix() + waiter

    def cancel_channel(self) -> str:
        return self._key("q", "cancels")

    def stream(self, session_id: str) -> str:
        return self._key("relay", "s", session_id)

    def stream_pattern(self) -> str:
        """A SCAN pattern for every session stream (the root has no glob chars
        only if the prefix, tenant and project have none)."""
        return self._key("relay", "s", "*")

    def published_once(self, key: str) -> str:
        """Marks an event published under a once-key (see Relay.publish)."""
        return self._key("relay", "once", key)

    def last_event(self) -> str:
        """The last event id handed out in the deployment, across sessions."""
        return self._key("relay", "last")

    def session(self, user_key: str) -> str:
        return self._key("st", "session", user_key)

    def counter(self, key: str, window_ms: int, window: int) -> str:
        # The window number goes last and has no colon, so the key is unambiguous.
        return self._key("st", "count", str(window_ms), key, str(window))

    def beats(self, role: str) -> str:
        return self._key("st", "beat", role)

    def beat_expiry(self, role: str) -> str:
        return self._key("st", "beat-at", role)

    def tally(self, name: str) -> str:
        """Hash: field -> running total; no expiry (see State.add)."""
        return self._key("st", "tally", name)

    def lock(self, name: str) -> str:
        return self._key("st", "lock", name)

    def lock_tokens(self) -> str:
        return self._key("st", "lock-token")

    def rate_burst(self, session_id: str) -> str:
        """Sorted set: the session's admitted requests in its burst window."""
        return self._key("gw", "rate-burst", session_id)

    def rate_hour(self, session_id: str) -> str:
        """Hash: the session's hour number and the requests admitted in it."""
        return self._key("gw", "rate-hour", session_id)

    def breaker(self, name: str) -> str:
        """Hash: a circuit breaker's state and half-open bookkeeping."""
        return self._key("gw", "breaker", name)

    def breaker_failures(self, name: str) -> str:
        """Sorted set: a closed breaker's recent failures, scored by time."""
        return self._key("gw", "breaker-fails", name)

    def gateway_config(self) -> str:
        """Hash: the live gateway config document and its version."""
        return self._key("gw", "config")

    def bundle_registry(self) -> str:
        """Hash: the live bundle registry document and its version."""
        return self._key("bundles", "registry")

    def _key(self, *parts: str) -> str:
        return ":".join((self.root, *parts))
