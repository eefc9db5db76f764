"""The launcher's outbox of job transitions (pure, no I/O).

Every transition gets the next sequence number and stays here until the server
acknowledges it (`TransitionAck.applied_through_seq`). After a reconnect, whatever the
server has not applied is sent again, in order; the server ignores a seq it already
applied, so nothing is lost and nothing is applied twice.
"""

from __future__ import annotations

from collections import OrderedDict

from balsam_grpc.v1 import session_service_pb2


class Outbox:
    def __init__(self, start_seq: int = 0) -> None:
        self.last_seq = start_seq
        self._pending: OrderedDict[int, session_service_pb2.JobTransition] = OrderedDict()
        self._sent_through = start_seq  # highest seq handed to the current stream

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def acked_through(self) -> int:
        return next(iter(self._pending)) - 1 if self._pending else self.last_seq

    def add(self, transition: session_service_pb2.JobTransition) -> int:
        """Number the transition and keep it until acknowledged; returns its seq."""
        self.last_seq += 1
        transition.seq = self.last_seq
        self._pending[self.last_seq] = transition
        return self.last_seq

    def has_unsent(self) -> bool:
        return self.last_seq > self._sent_through

    def awaiting_ack(self) -> bool:
        """Some transitions were handed to the stream and not acknowledged yet."""
        return self._sent_through > self.acked_through

    def take_unsent(self, limit: int = 1000) -> list[session_service_pb2.JobTransition]:
        """The next transitions to write on the stream, in seq order (marked as sent)."""
        out = []
        for seq, tr in self._pending.items():
            if seq <= self._sent_through:
                continue
            out.append(tr)
            if len(out) >= limit:
                break
        if out:
            self._sent_through = out[-1].seq
        return out

    def ack(self, applied_through_seq: int) -> list[session_service_pb2.JobTransition]:
        """Forget every transition up to `applied_through_seq`; returns them."""
        done = []
        while self._pending:
            seq = next(iter(self._pending))
            if seq > applied_through_seq:
                break
            done.append(self._pending.popitem(last=False)[1])
        return done

    def rewind(self, applied_through_seq: int) -> None:
        """After a reconnect: drop what the server applied, send everything else again."""
        self.ack(applied_through_seq)
        self._sent_through = max(applied_through_seq, self.acked_through)

    def pending_job_ids(self) -> set[int]:
        return {tr.job_id for tr in self._pending.values()}

    def reset(self) -> list[session_service_pb2.JobTransition]:
        """A new session: the old one's transitions can never be applied; drop them. The
        numbering restarts so the new session's seqs start at 1."""
        dropped = list(self._pending.values())
        self._pending.clear()
        self.last_seq = 0
        self._sent_through = 0
        return dropped
