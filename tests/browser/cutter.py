"""A TCP forwarder in front of the server whose connections a test can cut.

Chromium's offline emulation stops new requests but leaves an open response
streaming, so it cannot show what a dropped connection does to an answer in
flight. Closing the sockets here can: the browser sees its stream end the way
a lost network ends it.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit


class Cutter:
    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        assert parts.hostname is not None and parts.port is not None
        self._target = (parts.hostname, parts.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._refusing = False
        self.cuts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, *, refuse: bool = False) -> None:
        """Close every connection open now; with ``refuse``, also close new
        ones at once until ``restore``, as a network that stays down would."""
        self._refusing = refuse
        with self._lock:
            sockets, self._open = self._open, set()
            self.cuts += 1
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        self._refusing = False

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@contextmanager
def cutter_for(url: str) -> Iterator[Cutter]:
    cutter = Cutter(url)
    cutter.start()
    try:
        yield cutter
    finally:
        cutter.close()
