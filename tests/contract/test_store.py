"""The Store contract: conversations and turns, each visible to its user only."""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import pytest

from kdcube.store.ports import (
    ConversationNotFound,
    DeleteOutcome,
    NewTurn,
    Store,
    StoreError,
    SubmitResult,
    TurnNotFound,
    TurnOutcome,
    TurnState,
)
from kdcube.store.sqlite import connect, open_sqlite_store

from .conftest import StoreBackend

pytestmark = pytest.mark.anyio

DONE = TurnOutcome(TurnState.COMPLETED, final_answer="the answer")


def turn(
    turn_id: str, conversation_id: str = "c1", *, user: str = "alice", new: bool = False
) -> NewTurn:
    return NewTurn(
        user_id=user,
        conversation_id=conversation_id,
        create_conversation=new,
        bundle_id="echo",
        turn_id=turn_id,
        request_id=f"r-{turn_id}",
        message_kind="chat",
        prompt=f"prompt of {turn_id}",
    )


async def test_submit_creates_the_conversation(store: Store) -> None:
    result = await store.submit_turn(turn("t1", new=True))

    assert result == SubmitResult(conversation_created=True, busy=False)
    detail = await store.conversation("alice", "c1")
    assert detail.summary.conversation_id == "c1"
    assert detail.summary.bundle_id == "echo"
    assert detail.summary.title == "prompt of t1"
    assert detail.summary.state == "idle"
    assert detail.summary.current_turn_id is None
    [record] = detail.turns
    assert (record.turn_id, record.state, record.prompt) == (
        "t1",
        TurnState.QUEUED,
        "prompt of t1",
    )
    assert (record.bundle_id, record.message_kind) == ("echo", "chat")
    assert (record.final_answer, record.finished_at) == (None, None)


async def test_a_turn_lists_its_attachments(store: Store) -> None:
    files = (
        {"name": "notes.txt", "mime": "text/plain", "size": 12, "scan": "clean"},
        {"name": "ünï código.png", "mime": "image/png", "size": 3, "scan": "clean"},
    )
    await store.submit_turn(replace(turn("t1", new=True), attachments=files))
    await store.submit_turn(turn("t2"))

    detail = await store.conversation("alice", "c1")

    assert [record.attachments for record in detail.turns] == [list(files), []]


async def test_submit_to_an_existing_conversation(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))

    result = await store.submit_turn(turn("t2", new=True))

    assert result == SubmitResult(conversation_created=False, busy=True)
    detail = await store.conversation("alice", "c1")
    assert [record.turn_id for record in detail.turns] == ["t1", "t2"]


async def test_a_conversation_is_busy_while_a_turn_is_unfinished(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    await store.start_turn("t1")
    assert (await store.submit_turn(turn("t2"))).busy

    await store.finish_turn("t1", DONE)
    assert (await store.submit_turn(turn("t3"))).busy
    await store.finish_turn("t2", TurnOutcome(TurnState.CANCELLED))
    await store.finish_turn("t3", TurnOutcome(TurnState.FAILED, error_type="boom"))

    assert not (await store.submit_turn(turn("t4"))).busy


async def test_only_one_of_concurrent_submits_finds_it_idle(store: Store) -> None:
    await store.submit_turn(turn("t0", new=True))
    await store.finish_turn("t0", DONE)
    results: list[SubmitResult] = []

    async def submit(turn_id: str) -> None:
        results.append(await store.submit_turn(turn(turn_id)))

    async with anyio.create_task_group() as tasks:
        for index in range(8):
            tasks.start_soon(submit, f"t{index + 1}")

    assert sorted(result.busy for result in results) == [False] + [True] * 7
    assert len(await store.unfinished_turns("alice", "c1")) == 8


async def test_submit_without_create_needs_an_existing_conversation(
    store: Store,
) -> None:
    with pytest.raises(ConversationNotFound):
        await store.submit_turn(turn("t1"))

    with pytest.raises(ConversationNotFound):
        await store.conversation("alice", "c1")
    assert await store.conversations("alice") == []


async def test_a_failed_submit_changes_nothing(store: Store) -> None:
    await store.submit_turn(turn("t1", "c1", new=True))

    with pytest.raises(StoreError):
        await store.submit_turn(turn("t1", "c2", new=True))

    with pytest.raises(ConversationNotFound):
        await store.conversation("alice", "c2")
    summaries = await store.conversations("alice")
    assert [summary.conversation_id for summary in summaries] == ["c1"]


async def test_no_one_reaches_another_users_conversation(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))

    for create in (True, False):
        with pytest.raises(ConversationNotFound):
            await store.submit_turn(turn("t2", user="mallory", new=create))
    with pytest.raises(ConversationNotFound):
        await store.conversation("mallory", "c1")
    with pytest.raises(ConversationNotFound):
        await store.unfinished_turns("mallory", "c1")
    assert await store.conversations("mallory") == []
    assert await store.delete_conversation("mallory", "c1") is DeleteOutcome.NOT_FOUND

    detail = await store.conversation("alice", "c1")
    assert [record.turn_id for record in detail.turns] == ["t1"]


async def test_start_moves_a_queued_turn_to_running(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))

    assert await store.start_turn("t1") is True

    detail = await store.conversation("alice", "c1")
    assert detail.summary.state == "in_progress"
    assert detail.summary.current_turn_id == "t1"
    assert detail.turns[0].state is TurnState.RUNNING
    assert await store.start_turn("t1") is False
    assert await store.start_turn("unknown") is False


async def test_finish_records_the_outcome_once(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    await store.start_turn("t1")

    assert await store.finish_turn("t1", DONE) is True
    failed = TurnOutcome(TurnState.FAILED, error_type="late", error="too late")
    assert await store.finish_turn("t1", failed) is False

    detail = await store.conversation("alice", "c1")
    [record] = detail.turns
    assert (record.state, record.final_answer) == (TurnState.COMPLETED, "the answer")
    assert record.error_type is None
    assert record.finished_at is not None
    assert record.finished_at >= record.created_at
    assert detail.summary.state == "idle"


async def test_a_failed_turn_leaves_the_conversation_in_error(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    await store.start_turn("t1")

    await store.finish_turn("t1", TurnOutcome(TurnState.FAILED, error_type="boom"))

    detail = await store.conversation("alice", "c1")
    assert detail.summary.state == "error"
    assert detail.turns[0].error_type == "boom"


async def test_a_turn_finished_while_queued_never_starts(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))

    assert await store.finish_turn("t1", TurnOutcome(TurnState.CANCELLED)) is True

    assert await store.start_turn("t1") is False
    detail = await store.conversation("alice", "c1")
    assert detail.turns[0].state is TurnState.CANCELLED
    assert detail.summary.state == "idle"


async def test_finish_of_an_unknown_turn(store: Store) -> None:
    assert await store.finish_turn("unknown", DONE) is False


async def test_unfinished_turns_oldest_first(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    for turn_id in ("t2", "t3", "t4"):
        await store.submit_turn(turn(turn_id))
    await store.start_turn("t1")
    await store.finish_turn("t2", TurnOutcome(TurnState.CANCELLED))
    await store.submit_turn(turn("t5", "c2", new=True))

    assert await store.unfinished_turns("alice", "c1") == ["t1", "t3", "t4"]
    await store.finish_turn("t1", DONE)
    assert await store.unfinished_turns("alice", "c1") == ["t3", "t4"]


async def test_conversations_lists_the_users_own_newest_first(store: Store) -> None:
    for index, user in enumerate(["alice", "bob", "alice", "alice"]):
        await store.submit_turn(turn(f"t{index}", f"c{index}", user=user, new=True))
    await store.submit_turn(turn("t9", "c0"))

    alice = await store.conversations("alice")
    bob = await store.conversations("bob")

    assert [summary.conversation_id for summary in alice] == ["c3", "c2", "c0"]
    assert [summary.conversation_id for summary in bob] == ["c1"]
    assert await store.conversations("carol") == []


async def test_delete_refuses_a_busy_conversation(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))

    assert await store.delete_conversation("alice", "c1") is DeleteOutcome.BUSY
    await store.start_turn("t1")
    assert await store.delete_conversation("alice", "c1") is DeleteOutcome.BUSY
    detail = await store.conversation("alice", "c1")
    assert [record.state for record in detail.turns] == [TurnState.RUNNING]


async def test_delete_removes_the_conversation_and_its_turns(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    await store.finish_turn("t1", DONE)

    assert await store.delete_conversation("alice", "c1") is DeleteOutcome.DELETED

    with pytest.raises(ConversationNotFound):
        await store.conversation("alice", "c1")
    assert await store.conversations("alice") == []
    assert await store.delete_conversation("alice", "c1") is DeleteOutcome.NOT_FOUND
    assert await store.finish_turn("t1", DONE) is False

    result = await store.submit_turn(turn("t2", new=True))
    assert result == SubmitResult(conversation_created=True, busy=False)
    detail = await store.conversation("alice", "c1")
    assert [record.turn_id for record in detail.turns] == ["t2"]


async def test_delete_of_an_unknown_conversation(store: Store) -> None:
    assert await store.delete_conversation("alice", "nope") is DeleteOutcome.NOT_FOUND


async def test_interrupt_unfinished_ends_queued_and_running_turns(
    store: Store,
) -> None:
    await store.submit_turn(turn("t1", "c1", new=True))
    await store.submit_turn(turn("t2", "c1"))
    await store.start_turn("t1")
    await store.submit_turn(turn("t3", "c2", user="bob", new=True))
    await store.finish_turn("t3", DONE)

    assert await store.interrupt_unfinished() == 2

    detail = await store.conversation("alice", "c1")
    assert [record.state for record in detail.turns] == [TurnState.INTERRUPTED] * 2
    assert all(record.finished_at is not None for record in detail.turns)
    assert detail.summary.state != "in_progress"
    assert await store.unfinished_turns("alice", "c1") == []
    bob = await store.conversation("bob", "c2")
    assert bob.turns[0].state is TurnState.COMPLETED
    assert await store.interrupt_unfinished() == 0
    assert await store.finish_turn("t1", DONE) is False


async def test_reopening_keeps_data_and_migrates_once(
    store_backend: StoreBackend,
) -> None:
    async with store_backend.open() as store:
        await store.submit_turn(turn("t1", new=True))
    applied = store_backend.applied_migrations()

    async with store_backend.open() as store:
        detail = await store.conversation("alice", "c1")
        await store.submit_turn(turn("t2"))

    assert [record.turn_id for record in detail.turns] == ["t1"]
    assert applied
    assert store_backend.applied_migrations() == applied
    assert len(set(applied)) == len(applied)


async def test_the_outcome_of_a_finished_turn_can_be_read_back(store: Store) -> None:
    await store.submit_turn(
        NewTurn("u1", "c1", True, "echo", "t1", "r1", "regular", "hello")
    )
    before = await store.turn_outcome("t1")
    await store.start_turn("t1")
    outcome = TurnOutcome(TurnState.COMPLETED, final_answer="hello")
    await store.finish_turn("t1", outcome)

    assert before is None
    assert await store.turn_outcome("t1") == outcome
    assert await store.turn_outcome("nope") is None


def artifact(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "mime": "text/plain", "size": 1, **more}


async def test_a_turn_lists_its_artifacts_in_order(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    await store.submit_turn(turn("t2"))
    produced = [artifact("b.txt"), artifact("ä/a.png", key="k/1"), artifact("c")]

    for record in produced:
        await store.add_artifact("t1", record)

    detail = await store.conversation("alice", "c1")
    assert [record.artifacts for record in detail.turns] == [produced, []]
    assert detail.turns[0].to_json()["artifacts"] == produced


async def test_an_artifact_replaces_its_namesake_in_place(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    for name in ("a", "b", "c"):
        await store.add_artifact("t1", artifact(name))

    await store.add_artifact("t1", artifact("b", size=2))

    detail = await store.conversation("alice", "c1")
    assert detail.turns[0].artifacts == [
        artifact("a"),
        artifact("b", size=2),
        artifact("c"),
    ]


async def test_artifacts_can_be_added_to_a_finished_turn(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    await store.finish_turn("t1", DONE)

    await store.add_artifact("t1", artifact("late.txt"))

    detail = await store.conversation("alice", "c1")
    assert detail.turns[0].artifacts == [artifact("late.txt")]


async def test_concurrent_artifact_adds_all_land_once(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))
    names = [f"file-{index}" for index in range(20)]

    async with anyio.create_task_group() as tasks:
        for name in names * 2:
            tasks.start_soon(store.add_artifact, "t1", artifact(name))

    detail = await store.conversation("alice", "c1")
    listed = [record["name"] for record in detail.turns[0].artifacts]
    assert sorted(listed) == sorted(names)


async def test_an_artifact_needs_a_known_turn_and_a_name(store: Store) -> None:
    await store.submit_turn(turn("t1", new=True))

    with pytest.raises(TurnNotFound):
        await store.add_artifact("unknown", artifact("a"))
    with pytest.raises(ValueError, match="'name'"):
        await store.add_artifact("t1", {"mime": "text/plain"})
    with pytest.raises(ValueError, match="'name'"):
        await store.add_artifact("t1", {"name": 7})

    detail = await store.conversation("alice", "c1")
    assert detail.turns[0].artifacts == []


async def test_sqlite_migration_gives_earlier_turns_no_artifacts(
    tmp_path: Path,
) -> None:
    """A database at migration 1, with a turn in it, then opened by this code."""
    path = tmp_path / "kdcube.db"
    first = resources.files("kdcube.store.migrations.sqlite").joinpath(
        "0001_conversations.sql"
    )
    connection = connect(path)
    connection.executescript(
        f"""BEGIN;
        {first.read_text()}
        CREATE TABLE schema_migrations
            (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL);
        INSERT INTO schema_migrations VALUES (1, 0);
        INSERT INTO conversations VALUES ('c1', 'alice', 'echo', 't', 'idle',
            NULL, 0, 0);
        INSERT INTO turns (turn_id, conversation_id, seq, bundle_id, request_id,
            message_kind, prompt, state, created_at)
            VALUES ('t1', 'c1', 1, 'echo', 'r', 'chat', 'p', 'completed', 0);
        COMMIT;"""
    )
    connection.close()

    async with open_sqlite_store(path) as store:
        detail = await store.conversation("alice", "c1")
        await store.add_artifact("t1", artifact("a"))
        after = await store.conversation("alice", "c1")

    assert detail.turns[0].artifacts == []
    assert after.turns[0].artifacts == [artifact("a")]


async def _conversation_of(store: Store, count: int) -> None:
    """Turns t1..t<count> of alice's c1, in as many states as there are."""
    await store.submit_turn(turn("t1", new=True))
    for index in range(2, count + 1):
        await store.submit_turn(turn(f"t{index}"))
    await store.finish_turn("t1", DONE)
    await store.finish_turn("t2", TurnOutcome(TurnState.FAILED, error_type="boom"))
    await store.start_turn("t3")


async def test_history_lists_the_latest_turns_before_oldest_first(
    store: Store,
) -> None:
    await _conversation_of(store, 6)
    await store.add_artifact("t2", artifact("a"))
    await store.submit_turn(turn("t9", "c2", new=True))

    everything = await store.history("alice", "c1", before_turn_id="t5")
    latest = await store.history("alice", "c1", before_turn_id="t5", limit=2)

    assert [record.turn_id for record in everything] == ["t1", "t2", "t3", "t4"]
    assert [record.state for record in everything] == [
        TurnState.COMPLETED,
        TurnState.FAILED,
        TurnState.RUNNING,
        TurnState.QUEUED,
    ]
    assert everything[0].final_answer == "the answer"
    assert everything[1].artifacts == [artifact("a")]
    assert [record.turn_id for record in latest] == ["t3", "t4"]
    assert await store.history("alice", "c1", before_turn_id="t5", limit=0) == []


async def test_history_of_the_first_turn_is_empty(store: Store) -> None:
    await _conversation_of(store, 3)

    assert await store.history("alice", "c1", before_turn_id="t1") == []


async def test_history_is_the_owners_only(store: Store) -> None:
    await _conversation_of(store, 3)

    with pytest.raises(ConversationNotFound):
        await store.history("mallory", "c1", before_turn_id="t3")
    with pytest.raises(ConversationNotFound):
        await store.history("alice", "nope", before_turn_id="t3")


async def test_history_before_a_turn_not_in_the_conversation(store: Store) -> None:
    await _conversation_of(store, 3)
    await store.submit_turn(turn("t9", "c2", new=True))

    with pytest.raises(TurnNotFound):
        await store.history("alice", "c1", before_turn_id="t9")
    with pytest.raises(TurnNotFound):
        await store.history("alice", "c1", before_turn_id="unknown")
    with pytest.raises(ValueError, match="-1"):
        await store.history("alice", "c1", before_turn_id="t3", limit=-1)
