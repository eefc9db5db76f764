"""The fault-injection proxy of tests/support: its faults happen even on a slow machine."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tests.support.proxy import Proxy


def _echo_once() -> tuple[socket.socket, threading.Thread]:
    """A server that echoes what one connection sends."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(ConnectionError):  # the proxy resets its links
            while data := conn.recv(4096):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_dropped_answers_window_starts_with_the_first_answer() -> None:
    """Under load the first answer can come later than a drop window timed from the call
    to drop_responses: the fault then did not happen and tests asserting it failed
    (test_a_lost_first_answer_is_not_taken_for_a_missing_server, seen under load 9-15).
    The window opens when the first answer is swallowed."""
    listener, thread = _echo_once()
    host, port = listener.getsockname()
    try:
        with Proxy(f"{host}:{port}") as proxy:
            proxy.drop_responses(0.2)
            time.sleep(0.5)  # a slow client: its request comes after a clock-timed window
            with socket.create_connection(("127.0.0.1", proxy.port)) as client:
                client.settimeout(5)
                client.sendall(b"ping")
                deadline = time.monotonic() + 5
                while proxy.swallowed == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert proxy.swallowed == 4, "the answer was forwarded: the fault did not happen"
                # ... and the link is reset once the window has passed, as the client must see.
                with pytest.raises(ConnectionResetError):
                    client.recv(16)
    finally:
        listener.close()
        thread.join(5)
