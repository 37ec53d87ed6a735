"""Property-based fuzzing of the HTTP API, as a client sees it.

One real ``kdcube run`` process serves the whole module, with rate limits and
backpressure lifted so that the fuzzed requests reach the handlers instead of
stopping at 429. Hypothesis then sends it JSON chat submissions (random and
near-valid ones with one field spoiled), raw bodies, cancel and status
requests, random path segments on the conversation routes, hand-built
multipart bodies (odd part orders, names, file names, boundaries, cut short),
random ``Authorization``, ``Last-Event-ID`` and ``Content-Type`` headers, and
random gateway documents from an administrator.

Every answer must hold PROTOCOL.md's promises: status below 500; a 4xx is a
JSON ``{"error": <snake_case>, "detail": <str>}``; JSON is strict JSON; every
429 and 503 carries ``Retry-After``; and no body shows a traceback, an
exception repr or a path of the server's files (unless the request itself
sent that text, which an error may quote back).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

from tests.helpers import REPO, auth, prompt_body

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer dev-admin-root"}
BIG = 1_000_000
LIFTED = {
    "rate_limits": {
        kind: {"hourly": -1, "burst": BIG, "burst_window": 60}
        for kind in ("anonymous", "registered", "paid", "privileged")
    },
    "backpressure": {
        "capacity_buffer": 0,
        "queue_depth_multiplier": 1000,
        "anonymous_pressure_threshold": 0.96,
        "registered_pressure_threshold": 0.97,
        "paid_pressure_threshold": 0.97,
        "hard_limit_threshold": 0.99,
        "max_queue_size": 0,
    },
}
MARKERS = ("Traceback", 'File "', "Error(")
SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    # Fixed examples under CI, so a run is repeatable; fresh ones elsewhere,
    # so developers keep exploring.
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@dataclass(frozen=True)
class Target:
    """The running server, and one conversation of alice's with a file."""

    client: httpx.Client
    url: str
    home: Path
    conversation_id: str
    turn_id: str


# ---------------------------------------------------------------- the server


def _wait_for_url(process: subprocess.Popen[bytes], stdout: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in stdout.read_text().splitlines():
            if "ready at" in line:
                return line.rsplit(" ", 1)[-1].strip()
        assert process.poll() is None, "kdcube run exited before it was ready"
        time.sleep(0.05)
    raise AssertionError("kdcube run did not print its URL within 30 s")


def _seed(client: httpx.Client) -> tuple[str, str]:
    """A conversation with an attachment, so fuzzed ids sometimes hit one."""
    response = client.post(
        "/sse/chat",
        params={"stream_id": "seed"},
        data={"event_submission": json.dumps(prompt_body("seed"))},
        files={"files": ("a.txt", b"hello there\n", "text/plain")},
        headers=auth("alice"),
    )
    assert response.status_code == 200, response.text
    ack = response.json()
    return str(ack["conversation_id"]), str(ack["turn_id"])


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    folder = tmp_path_factory.mktemp("fuzz")
    gateway = folder / "gateway.yaml"
    gateway.write_text(yaml.safe_dump({"gateway": LIFTED}))
    home = folder / "home"
    stdout, stderr = folder / "stdout.log", folder / "stderr.log"
    env = {
        **os.environ,
        "KDCUBE_HOME": str(home),
        "KDCUBE_GATEWAY_CONFIG": str(gateway),
        "KDCUBE_DRAIN_TIMEOUT_S": "5",
    }
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "kdcube", "run", "--port", "0"],
            stdout=out,
            stderr=err,
            env=env,
        )
    try:
        url = _wait_for_url(process, stdout)
        # One connection per request: a stalled keep-alive connection (see
        # test_an_unread_body_does_not_stall_the_connection) would otherwise
        # turn every property below into a timeout.
        fresh = {"Connection": "close"}
        with httpx.Client(base_url=url, timeout=10, headers=fresh) as client:
            conversation_id, turn_id = _seed(client)
            yield Target(client, url, home, conversation_id, turn_id)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=15)
        assert code == 0, stderr.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ------------------------------------------------------------ the properties


def _sent_text(request: httpx.Request) -> str:
    """Everything the client sent, as text an error might quote back."""
    try:
        raw = request.content
    except httpx.RequestNotRead:
        raw = b""
    parts = [
        raw.decode("utf-8", "replace"),
        unquote_to_bytes(str(request.url)).decode("utf-8", "replace"),
        *(v.decode("latin-1") for _, v in request.headers.raw),
    ]
    return "\n".join(parts)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _describe(response: httpx.Response) -> str:
    request = response.request
    return (
        f"{request.method} {request.url} -> {response.status_code}"
        f" {response.headers.get('content-type')!r}\n{response.text[:2000]}"
    )


def check(response: httpx.Response, target: Target) -> None:
    """PROTOCOL.md's promises for one answer whose body has been read."""
    about = _describe(response)
    status = response.status_code
    assert status < 500, about
    if status in (429, 503):
        assert response.headers.get("retry-after", "").isdigit(), about

    text = response.text
    is_json = response.headers.get("content-type", "").startswith("application/json")
    body = _strict_json(text) if is_json else None
    if 400 <= status < 500:
        assert isinstance(body, dict), f"a 4xx must be a JSON object: {about}"
        assert isinstance(body.get("error"), str), about
        assert SNAKE_CASE.fullmatch(body["error"]), about
        assert isinstance(body.get("detail"), str), about
        if "retry_after" in body:
            assert isinstance(body["retry_after"], int), about

    code = body.get("error") if isinstance(body, dict) else None
    event(f"{status} {code or ''}".strip())

    sent = _sent_text(response.request)
    shown = "\n".join([text, *_strings(body)])
    for marker in (*MARKERS, str(REPO), str(target.home)):
        if marker in shown and marker not in sent:
            raise AssertionError(f"the answer shows {marker!r}: {about}")


def send(target: Target, method: str, url: str, **kwargs: Any) -> httpx.Response:
    response = target.client.request(method, url, **kwargs)
    check(response, target)
    return response


# ---------------------------------------------------------------- strategies

# Any character but surrogates (httpx and JSON cannot carry them), NUL included.
odd_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
huge_text = st.integers(0, 33_000).map(lambda n: "x" * n)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | odd_text
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(odd_text.filter(bool), inner, max_size=4)
    ),
    max_leaves=15,
)
garbage = json_values | huge_text | st.sampled_from(["", "\x00", "../x", "a" * 129])

client_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True)
stream_ids = st.none() | client_ids | odd_text | st.just("a" * 200)
good_stream_ids = st.none() | client_ids

DELETE = object()
FIELDS: list[tuple[str | int, ...]] = [
    ("conversation_id",),
    ("bundle_id",),
    ("tenant",),
    ("project",),
    ("message_kind",),
    ("external_events",),
    ("external_events", 0),
    ("external_events", 0, "event_id"),
    ("external_events", 0, "type"),
    ("external_events", 0, "event_source_id"),
    ("external_events", 0, "reactive"),
    ("external_events", 0, "payload"),
    ("external_events", 0, "payload", "mime"),
    ("external_events", 0, "payload", "event"),
    ("external_events", 0, "payload", "event", "text"),
]
field_values = (
    garbage
    | st.just(DELETE)
    | st.sampled_from(
        [
            "event.user.followup",
            "event.user.steer",
            "event.user.poke",
            "steer",
            "followup",
            "echo",
            "nope",
            "default",
        ]
    )
)


def _spoiled(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A valid submission with the field at ``path`` set to ``value`` (or gone)."""
    body = prompt_body(
        "hello",
        bundle_id="echo",
        message_kind="regular",
        tenant=None,
        project=None,
    )
    body["external_events"][0]["event_id"] = "e1"
    body["external_events"][0]["reactive"] = True
    holder: Any = body
    for step in path[:-1]:
        holder = holder[step]
    if value is DELETE and isinstance(holder, dict):
        holder.pop(path[-1], None)
    elif value is DELETE:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return body


near_valid = st.builds(_spoiled, st.sampled_from(FIELDS), field_values)


class Blob:
    """A raw body that shows as its label, so a failing example stays readable.

    (Not a dataclass: Hypothesis would print a dataclass field by field.)
    """

    def __init__(self, label: str, data: bytes) -> None:
        self.label = label
        self.data = data

    def __repr__(self) -> str:
        return f"Blob({self.label!r})"


def _blob(data: bytes) -> Blob:
    return Blob(repr(data), data)


LONE_SURROGATE = Blob(
    "a prompt with an escaped lone surrogate",
    b'{"external_events": [{"type": "event.user.prompt",'
    b' "payload": {"event": {"text": "\\ud800"}}}]}',
)
PATHOLOGICAL = [
    LONE_SURROGATE,
    Blob("deep array", b"[" * 100_000),
    Blob("deep object", b'{"a":' * 50_000),
    Blob("5000-digit number", b"1" * 5000),
    Blob(
        "30000 empty events",
        b'{"external_events": [' + b"{}," * 30_000 + b"{}]}",
    ),
]
small_raw_bodies = st.binary(max_size=200).map(_blob) | st.sampled_from(
    [
        b"",
        b"{",
        b"null",
        b"NaN",
        b'{"external_events": Infinity}',
        b"\xff\xfe\x00",
        b"\xef\xbb\xbf{}",
        b'"\\ud800"',
    ]
).map(_blob)
raw_bodies = small_raw_bodies | st.sampled_from(PATHOLOGICAL)

json_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "APPLICATION/JSON",
        "text/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/yaml",
        "",
        ";;;",
        "application/json; boundary",
    ]
)

token_chars = st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(
    lambda c: c != "\x7f"
)
header_text = st.text(token_chars, max_size=60).map(str.strip)
valid_authorizations = st.none() | st.sampled_from(
    ["Bearer dev-alice", "Bearer dev-bob", "Bearer dev-admin-root"]
)
bad_authorizations = st.one_of(
    st.sampled_from(
        ["dev-alice", "dev-admin-root", "Bearer", "Bearer ", "bearer dev-x"]
    ),
    st.builds("Bearer dev-{}".format, header_text),
    st.builds("Bearer dev-admin-{}".format, header_text),
    st.builds("Bearer {}".format, header_text),
    st.builds("Basic {}".format, header_text),
    header_text,
)
authorizations = st.integers(0, 1).flatmap(
    lambda bad: bad_authorizations if bad else valid_authorizations
)


def _headers(authorization: str | None, **more: str | None) -> dict[bytes, bytes]:
    """Headers as bytes, so latin-1 garbage goes out as it is."""
    given = {"Authorization": authorization, **more}
    return {
        name.encode(): value.strip().encode("latin-1")
        for name, value in given.items()
        if value is not None
    }


# ------------------------------------------------------- keep-alive stalls

EARLY_REFUSALS = {
    "chat with a bad stream_id": ("POST", "/sse/chat?stream_id=a%20b", auth("alice")),
    "chat with a bad token": ("POST", "/sse/chat", {"Authorization": "Bearer nope"}),
    "cancel as text/plain": (
        "POST",
        "/sse/cancel",
        {"Content-Type": "text/plain", **auth("alice")},
    ),
    "health with a body": ("GET", "/health", {}),
}


def _late(body: bytes) -> Iterator[bytes]:
    """The body, sent a moment after the headers: by then the server has
    already refused the request from its headers alone."""
    time.sleep(0.1)
    yield body


@settings(FUZZ, max_examples=4, phases=[Phase.explicit, Phase.generate])
@given(
    refusal=st.sampled_from(sorted(EARLY_REFUSALS)),
    body=st.binary(min_size=1, max_size=64),
)
def test_an_unread_body_does_not_stall_the_connection(
    target: Target, refusal: str, body: bytes
) -> None:
    """A request answered before its body arrived leaves its keep-alive
    connection usable (read on, or closed): the next request on it is
    answered at once, not left waiting."""
    method, url, headers = EARLY_REFUSALS[refusal]
    sized = {**headers, "Content-Length": str(len(body))}
    with httpx.Client(base_url=target.url, timeout=2) as client:
        check(client.request(method, url, content=_late(body), headers=sized), target)
        try:
            after = client.get("/health")
        except httpx.TimeoutException:
            raise AssertionError(
                f"after {refusal} whose body came late, the next request on the"
                " same connection got no answer within 2 s"
            ) from None
        assert after.status_code == 200, after.text


# ---------------------------------------------------------------- JSON chats

users = st.sampled_from(["alice", "bob", "admin-root"])


@FUZZ
@given(body=json_values | near_valid, stream_id=stream_ids, user=users)
def test_json_chat_submissions(
    target: Target, body: Any, stream_id: str | None, user: str
) -> None:
    params = {} if stream_id is None else {"stream_id": stream_id}
    send(target, "POST", "/sse/chat", params=params, json=body, headers=auth(user))


@FUZZ
@example(raw=LONE_SURROGATE, content_type="application/json", authorization=None)
@example(
    raw=PATHOLOGICAL[1],
    content_type="application/json",
    authorization="Bearer dev-alice",
)
@given(raw=raw_bodies, content_type=json_types, authorization=authorizations)
def test_raw_chat_bodies_and_headers(
    target: Target, raw: Blob, content_type: str, authorization: str | None
) -> None:
    headers = _headers(authorization, **{"Content-Type": content_type})
    send(target, "POST", "/sse/chat", content=raw.data, headers=headers)


# ------------------------------------------------- cancel and status, by JSON


SEEDED = "<the seeded id>"
"""Stands for the seeded conversation's (or turn's) id in generated values."""


def _seeded(body: Any, target: Target) -> Any:
    """``body`` with SEEDED put back to the seeded conversation and turn ids."""
    if not isinstance(body, dict):
        return body
    ids = {"conversation_id": target.conversation_id, "turn_id": target.turn_id}
    return {k: ids[k] if v == SEEDED and k in ids else v for k, v in body.items()}


control_bodies = (
    json_values
    | st.fixed_dictionaries(
        {"conversation_id": st.just(SEEDED) | garbage},
        optional={"turn_id": garbage | st.just(SEEDED)},
    )
    | raw_bodies
)


@FUZZ
@example(route="/sse/cancel", body=PATHOLOGICAL[1], stream_id=None, user="alice")
@given(
    route=st.sampled_from(["/sse/cancel", "/sse/conv_status.get"]),
    body=control_bodies,
    stream_id=stream_ids,
    user=users,
)
def test_cancel_and_status_with_random_json(
    target: Target, route: str, body: Any, stream_id: str | None, user: str
) -> None:
    params = {} if stream_id is None else {"stream_id": stream_id}
    if isinstance(body, Blob):
        headers = {"Content-Type": "application/json", **auth(user)}
        send(target, "POST", route, params=params, content=body.data, headers=headers)
    else:
        body = _seeded(body, target)
        send(target, "POST", route, params=params, json=body, headers=auth(user))


# --------------------------------------------------- conversation path routes

segments = (
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=120)
    | client_ids
    | st.sampled_from(["..", ".", "%2e%2e", "~", "a" * 300, "..%2f..%2fetc"])
)


def _segment(value: str, keep_slash: bool = False) -> str:
    return quote(value, safe="/" if keep_slash else "")


@FUZZ
@given(
    method=st.sampled_from(["GET", "DELETE"]),
    conversation=segments,
    user=users,
)
def test_conversation_by_random_id(
    target: Target, method: str, conversation: str, user: str
) -> None:
    url = f"/api/conversations/{_segment(conversation)}"
    send(target, method, url, headers=auth(user))


@FUZZ
@example(conversation=SEEDED, turn=SEEDED, name="a.txt", keep_slash=False, user="alice")
@given(
    conversation=segments | st.just(SEEDED),
    turn=segments | st.just(SEEDED),
    name=segments
    | st.sampled_from(["a.txt", "../../etc/passwd", "a.txt/..", "/a.txt"]),
    keep_slash=st.booleans(),
    user=users,
)
def test_attachment_by_random_path(
    target: Target, conversation: str, turn: str, name: str, keep_slash: bool, user: str
) -> None:
    conversation = target.conversation_id if conversation == SEEDED else conversation
    turn = target.turn_id if turn == SEEDED else turn
    url = (
        f"/api/conversations/{_segment(conversation)}/turns/{_segment(turn)}"
        f"/attachments/{_segment(name, keep_slash)}"
    )
    send(target, "GET", url, headers=auth(user))


# ------------------------------------------------------------ multipart chats


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    content: bytes

    def encode(self, boundary: bytes) -> bytes:
        disposition = f'form-data; name="{self.name}"'
        if self.filename is not None:
            disposition += f'; filename="{self.filename}"'
        lines = [f"Content-Disposition: {disposition}"]
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        head = "\r\n".join(lines).encode("utf-8", "surrogatepass")
        return b"--" + boundary + b"\r\n" + head + b"\r\n\r\n" + self.content + b"\r\n"


file_names = (
    st.none()
    | st.sampled_from(
        [
            "../../etc/passwd",
            "..\\..\\boot.ini",
            "/etc/shadow",
            "a.txt",
            "a.pdf",
            "",
            ".",
            "..",
            "x" * 300,
            "y" * 5000 + ".txt",
            "\u202egnp.exe",
            'quo"te.txt',
            "nul\x00.txt",
            "con.txt",
        ]
    )
    | st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=80)
)
contents = st.binary(max_size=300) | st.sampled_from(
    [
        b"hello world\n",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"%PDF-1.4\n%%EOF\n",
        b"\xff\xd8\xff\xe0" + b"\x00" * 40,
        b"PK\x03\x04" + b"\x00" * 40,
        b"",
    ]
)
part_content_types = st.none() | st.sampled_from(
    ["text/plain", "application/json", "image/png", "application/x-msdownload", "a/b/c"]
)
submission_contents = (
    st.just(json.dumps(prompt_body("with files")).encode())
    | near_valid.map(lambda body: json.dumps(body).encode())
    | json_values.map(lambda body: json.dumps(body).encode())
    | small_raw_bodies.map(lambda blob: blob.data)
)


@st.composite
def multipart_parts(draw: st.DrawFn) -> list[Part]:
    parts = []
    if draw(st.integers(0, 3)) > 0:
        parts.append(Part("event_submission", None, None, draw(submission_contents)))
    for _ in range(draw(st.integers(0, 3))):
        parts.append(
            Part(
                draw(
                    st.sampled_from(["files", "files", "event_submission", "other", ""])
                ),
                draw(file_names),
                draw(part_content_types),
                draw(contents),
            )
        )
    if draw(st.integers(0, 3)) == 0:
        parts = draw(st.permutations(parts))
    return list(parts)


TOKEN = re.compile(rb"[A-Za-z0-9_-]+")
boundaries = st.from_regex(TOKEN, fullmatch=True).map(lambda b: b[:70]) | st.from_regex(
    rb"[A-Za-z0-9'()+_,./:=?-]{1,70}", fullmatch=True
)


@st.composite
def multipart_requests(draw: st.DrawFn) -> tuple[bytes, str]:
    """A body and its Content-Type, well-formed or broken on purpose."""
    boundary = draw(boundaries)
    body = b"".join(p.encode(boundary) for p in draw(multipart_parts()))
    closing = [b"--" + boundary + b"--\r\n"] * 6 + [b"", b"--" + boundary]
    body += draw(st.sampled_from(closing))
    if draw(st.integers(0, 3)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    declared = draw(
        st.sampled_from(["same"] * 10 + ["quoted", "other", "missing", "empty", "long"])
    )
    header = {
        "same": f"boundary={boundary.decode()}"
        if TOKEN.fullmatch(boundary)
        else f'boundary="{boundary.decode()}"',
        "quoted": f'boundary="{boundary.decode()}"',
        "other": "boundary=nope",
        "missing": "",
        "empty": "boundary=",
        "long": "boundary=" + "b" * 500,
    }[declared]
    return body, f"multipart/form-data; {header}".strip()


def _well_formed(parts: list[Part]) -> tuple[bytes, str]:
    body = b"".join(p.encode(b"b") for p in parts) + b"--b--\r\n"
    return body, "multipart/form-data; boundary=b"


PROMPT_PART = Part(
    "event_submission", None, None, json.dumps(prompt_body("hi")).encode()
)


@FUZZ
@example(
    request=_well_formed(
        [PROMPT_PART, Part("files", "文件.txt", "text/plain", b"hi\n")]
    ),
    stream_id=None,
    user="alice",
)
@given(request=multipart_requests(), stream_id=good_stream_ids, user=users)
def test_multipart_chats(
    target: Target, request: tuple[bytes, str], stream_id: str | None, user: str
) -> None:
    body, content_type = request
    params = {} if stream_id is None else {"stream_id": stream_id}
    headers = {"Content-Type": content_type, **auth(user)}
    send(target, "POST", "/sse/chat", params=params, content=body, headers=headers)


# --------------------------------------------------------- headers on streams

last_event_ids = (
    st.none() | header_text | st.from_regex(r"[0-9]{1,25}-[0-9]{1,25}", fullmatch=True)
)


@FUZZ
@given(
    authorization=authorizations,
    last_event_id=last_event_ids,
    query_id=st.none() | odd_text,
    stream_id=stream_ids,
)
def test_stream_headers(
    target: Target,
    authorization: str | None,
    last_event_id: str | None,
    query_id: str | None,
    stream_id: str | None,
) -> None:
    params = {
        k: v
        for k, v in {"stream_id": stream_id, "last_event_id": query_id}.items()
        if v is not None
    }
    headers = _headers(authorization, **{"Last-Event-ID": last_event_id})
    with target.client.stream(
        "GET", "/sse/stream", params=params, headers=headers
    ) as response:
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("text/event-stream")
            event("200 stream opened")
            return
        response.read()
    check(response, target)


@FUZZ
@given(
    authorization=authorizations,
    route=st.sampled_from(
        [
            ("GET", "/api/conversations"),
            ("POST", "/sse/cancel"),
            ("POST", "/sse/conv_status.get"),
            ("GET", "/admin/gateway"),
            ("GET", "/health"),
            ("PUT", "/sse/chat"),
            ("GET", "/nowhere"),
        ]
    ),
    content_type=json_types,
)
def test_any_route_with_random_headers(
    target: Target, authorization: str | None, route: tuple[str, str], content_type: str
) -> None:
    method, url = route
    headers = _headers(authorization, **{"Content-Type": content_type})
    body = json.dumps({"conversation_id": target.conversation_id}).encode()
    send(target, method, url, content=body, headers=headers)


# ------------------------------------------------------------ admin: gateway

numbers = (
    st.integers(-5, 10)
    | st.integers()
    | st.floats()
    | st.sampled_from([0, -1, 0.5, 1e308, 10**30])
)
gateway_fields = st.sampled_from(
    [
        ("enabled",),
        ("profile",),
        ("rate_limits", "registered", "burst"),
        ("rate_limits", "registered", "hourly"),
        ("rate_limits", "anonymous", "burst_window"),
        ("rate_limits", "external"),
        ("backpressure", "capacity_buffer"),
        ("backpressure", "queue_depth_multiplier"),
        ("backpressure", "hard_limit_threshold"),
        ("backpressure", "max_queue_size"),
        ("limits", "max_sse_connections_per_instance"),
        ("circuit_breakers", "redis", "window_s"),
        ("circuit_breakers", "clamd", "recovery_timeout_s"),
        ("circuit_breakers", "made_up", "failure_threshold"),
        ("monitoring", "heartbeat_timeout_seconds"),
        ("surprise",),
    ]
)


def _gateway_document(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    document: dict[str, Any] = {}
    holder = document
    for step in path[:-1]:
        holder = holder.setdefault(step, {})
    holder[path[-1]] = value
    return {"gateway": document}


gateway_documents = (
    st.builds(_gateway_document, gateway_fields, numbers | garbage) | json_values
)


def _render(document: Any, as_yaml: bool) -> bytes:
    if as_yaml:
        return yaml.safe_dump(document, allow_unicode=True).encode()
    return json.dumps(document).encode()


DEEP_DOCUMENT = Blob("deep YAML flow sequence", b"[" * 50_000)
HUGE_MULTIPLIER = _blob(b"gateway:\n  backpressure: {queue_depth_multiplier: 1e308}")
ENDLESS_WINDOW = _blob(b"gateway:\n  circuit_breakers: {redis: {window_s: .inf}}")
raw_yaml = st.sampled_from(
    [
        DEEP_DOCUMENT,
        HUGE_MULTIPLIER,
        ENDLESS_WINDOW,
        Blob("deep YAML block sequence", b"- " * 20_000),
    ]
) | st.sampled_from(
    [
        b"gateway: [",
        b"a: &a [*a]",
        b"- - - - -",
        b"!!python/object/apply:os.system ['true']",
        b"gateway:\n  rate_limits:\n    registered: {burst: .inf}",
        b"gateway:\n  backpressure: {queue_depth_multiplier: .inf}",
        b"gateway:\n  backpressure: {capacity_buffer: .nan}",
        b"? [a, b]\n: c",
        b"\t",
        b"\xff\xfe",
    ]
).map(_blob)


@FUZZ
@example(
    document=None,
    as_yaml=True,
    raw=DEEP_DOCUMENT,
    route="/admin/gateway/validate",
    content_type="application/yaml",
)
@example(
    document=None,
    as_yaml=True,
    raw=ENDLESS_WINDOW,
    route="/admin/gateway/validate",
    content_type="application/yaml",
)
@example(
    document=None,
    as_yaml=True,
    raw=HUGE_MULTIPLIER,
    route="/admin/gateway",
    content_type="application/yaml",
)
@given(
    document=gateway_documents,
    as_yaml=st.booleans(),
    raw=st.none() | raw_yaml,
    route=st.sampled_from(["/admin/gateway", "/admin/gateway/validate"]),
    content_type=st.sampled_from(
        ["application/yaml", "application/json", "text/plain"]
    ),
)
def test_admin_gateway_documents(
    target: Target,
    document: Any,
    as_yaml: bool,
    raw: Blob | None,
    route: str,
    content_type: str,
) -> None:
    body = raw.data if raw is not None else _render(document, as_yaml)
    headers = {"Content-Type": content_type, **ADMIN}
    try:
        answer = send(target, "POST", route, content=body, headers=headers)
        if answer.status_code == 200:
            # What was applied must not break the requests that follow.
            send(target, "GET", "/admin/gateway", headers=ADMIN)
            send(target, "GET", "/api/conversations", headers=auth("bob"))
            send(
                target, "POST", "/sse/chat", json=prompt_body("hi"), headers=auth("bob")
            )
    finally:
        reset = target.client.post("/admin/gateway/reset", headers=ADMIN)
        assert reset.status_code == 200, reset.text
