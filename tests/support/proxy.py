"""An in-process TCP proxy for fault injection: 127.0.0.1:<port> -> target.

One selector thread moves bytes for every connection ("link": the client's socket and the
one to the target). Faults, applied to the links open at the time of the call:

- `cut(reset=True)`: close both ends, with RST (a dead link) or FIN (`reset=False`);
- `blackhole(new_connections=True)`: stop forwarding in both directions WITHOUT closing.
  Bytes read are discarded, an end that closes is not told to the other end: each peer
  only finds out through its own keepalive, as behind a dead NAT or a pulled cable.
  With `new_connections`, connections accepted until `heal()` are black holes too
  (accepted, never connected upstream);
- `drop_responses(seconds)`: forward what clients send, swallow what the server answers
  for `seconds` from the first answer swallowed, then reset those links (the client sees
  UNAVAILABLE after the server has done the work: the case request ids exist for).
  Connections accepted meanwhile are treated the same. The window is timed from the
  first answer, not from the call: on a loaded machine the answer can come later than
  any fixed window, and the fault would not happen.

Black-holed links stay open until the proxy closes. Counters (`accepted`, `swallowed`,
`blackholed`) let tests prove the fault really happened.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Self

FORWARD, BLACKHOLE, DROP = "forward", "blackhole", "drop"


@dataclass(eq=False)
class Link:
    client: socket.socket
    upstream: socket.socket | None
    mode: str = FORWARD
    open_ends: set[socket.socket] = field(default_factory=set)

    def other(self, sock: socket.socket) -> socket.socket | None:
        return self.upstream if sock is self.client else self.client


class Proxy:
    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.links: set[Link] = set()
        self.accepted = 0
        self.swallowed = 0  # bytes of server answers dropped
        self.blackholed = 0  # bytes discarded by black holes
        self._new_mode = FORWARD
        self._drop_seconds = 0.0
        self._drop_until: float | None = None  # None: no answer swallowed yet
        self._commands: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.running = True
        self.thread = threading.Thread(target=self._loop, name=f"proxy-{self.port}", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ public API
    def retarget(self, target: str) -> None:
        """New connections go to `target` (a server restarted on another port)."""
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))

    def cut(self, reset: bool = True) -> None:
        self._command("cut", reset)

    def blackhole(self, new_connections: bool = True) -> None:
        self._command("blackhole", new_connections)

    def heal(self) -> None:
        """New connections are forwarded again (black-holed ones stay dead)."""
        self._command("heal")

    def drop_responses(self, seconds: float) -> None:
        self._command("drop", seconds)

    @property
    def open_links(self) -> int:
        return len(self.links)

    def close(self) -> None:
        if not self.running:
            return
        self._command("close")
        self.running = False
        self.thread.join(5)
        self.listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ selector thread
    def _command(self, name: str, *args: object) -> None:
        """Run on the selector thread (it owns every socket); wait until applied."""
        done = threading.Event()
        with self._lock:
            self._commands.append((name, (*args, done)))
        if threading.current_thread() is not self.thread and self.thread.is_alive():
            done.wait(5)

    def _apply(self, name: str, args: tuple) -> None:
        *params, done = args
        if name == "cut":
            for link in list(self.links):
                self._close_link(link, reset=params[0])
        elif name == "blackhole":
            for link in self.links:
                link.mode = BLACKHOLE
            if params[0]:
                self._new_mode = BLACKHOLE
        elif name == "heal":
            self._new_mode = FORWARD
        elif name == "drop":
            self._drop_seconds, self._drop_until = float(params[0]), None
            self._new_mode = DROP
            for link in self.links:
                if link.mode == FORWARD:
                    link.mode = DROP
        elif name == "close":
            for link in list(self.links):
                self._close_link(link, reset=True)
            self.running = False
        done.set()

    def _loop(self) -> None:
        while self.running:
            with self._lock:
                commands, self._commands = self._commands, []
            for name, args in commands:
                self._apply(name, args)
            if not self.running:
                break
            if self._new_mode == DROP and self._drop_until is not None and time.monotonic() >= self._drop_until:
                self._new_mode = FORWARD
                for link in list(self.links):
                    if link.mode == DROP:
                        self._close_link(link, reset=True)
            for key, _ in self.sel.select(0.02):
                sock = key.fileobj
                if sock is self.listener:
                    self._accept()
                    continue
                link = key.data
                if link not in self.links:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                self._on_data(link, sock, data)
        for link in list(self.links):
            self._close_link(link, reset=True)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        mode = self._new_mode
        upstream = None
        if mode != BLACKHOLE:
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                # Nothing listens there (server down): what a client would see without a proxy.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                return
        link = Link(client, upstream, mode)
        for s in (client, upstream):
            if s is None:
                continue
            s.setblocking(True)
            s.settimeout(5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link.open_ends.add(s)
            self.sel.register(s, selectors.EVENT_READ, link)
        self.links.add(link)

    def _on_data(self, link: Link, sock: socket.socket, data: bytes) -> None:
        if link.mode == BLACKHOLE:
            if data:
                self.blackholed += len(data)
            else:  # this end gave up; the other end must not hear of it
                self._close_end(link, sock)
            return
        if not data:
            self._close_link(link, reset=False)
            return
        if link.mode == DROP and sock is link.upstream:
            self.swallowed += len(data)
            if self._drop_until is None:
                self._drop_until = time.monotonic() + self._drop_seconds
            return
        other = link.other(sock)
        try:
            assert other is not None
            other.sendall(data)
        except (OSError, AssertionError):
            self._close_link(link, reset=True)

    def _close_end(self, link: Link, sock: socket.socket) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        link.open_ends.discard(sock)
        if not link.open_ends:
            self.links.discard(link)

    def _close_link(self, link: Link, reset: bool) -> None:
        for s in list(link.open_ends):
            if reset:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self._close_end(link, s)
        self.links.discard(link)
