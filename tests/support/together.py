"""Several copies of one call sent at the same moment (a client's overlapping retries)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc


def sent_together(call: Callable[[], Any], copies: int = 4) -> list[Any]:
    """Run `call` in `copies` threads released together; each answer, or the RpcError's
    "code: details" for a call that failed, in the order they came back."""
    answers: list[Any] = []
    barrier = threading.Barrier(copies)

    def send() -> None:
        barrier.wait()
        try:
            answers.append(call())
        except grpc.RpcError as exc:
            answers.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=send) for _ in range(copies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers
