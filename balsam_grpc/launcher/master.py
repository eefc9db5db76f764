"""Rank 0 of the launcher: the session, the node manager and the jobs.

One asyncio loop: the SessionClient reads leases/acks/kills and writes credits/reports;
the main loop reaps finished processes (woken by SIGCHLD locally, or by polling worker
ranks), places queued jobs with the node manager, reports outcomes through the outbox,
and watches the clock (per-job limits live in the runners; the allocation's end and the
idle timeout here).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from balsam_grpc.core.errors import BalsamError
from balsam_grpc.launcher.config import LauncherConfig
from balsam_grpc.launcher.dispatch import Dispatcher
from balsam_grpc.launcher.node_manager import Assignment, NodeManager, Resources
from balsam_grpc.launcher.nodes import NodeSpec
from balsam_grpc.launcher.outcomes import outcome_transition, transition
from balsam_grpc.launcher.process_spec import ProcessSpec, RunContext, build_process_spec
from balsam_grpc.launcher.runner import WITHDRAWN, ProcessResult
from balsam_grpc.launcher.session import Callbacks, SessionClient
from balsam_grpc.v1 import common_pb2, job_pb2, session_pb2
from balsam_grpc.v1 import session_service_pb2 as pb

log = structlog.get_logger("balsam.launcher")
_STATE_NAMES = {number: name.removeprefix("JOB_STATE_") for name, number in job_pb2.JobState.items()}
VERSION = "0.1.0"
IDLE_TICK_S = 0.5
CLOSE_TIMEOUT_S = 15.0


@dataclass
class LocalJob:
    leased: pb.LeasedJob
    res: Resources
    placed: Assignment | None = None
    started: float = 0.0
    unfit: str | None = None  # why it can never run here (NodeManager.never_fits), if so
    footprint: float = 0.0  # nodes it takes (occupancy x nodes), for the credit's sums

    @property
    def id(self) -> int:
        return self.leased.job.id

    @property
    def held_ahead(self) -> bool:
        """Leased ahead of a free slot: still in its runnable state on the server until
        this launcher reports RUNNING when it starts it."""
        return self.leased.job.state != job_pb2.JOB_STATE_RUNNING


class JobQueue:
    """Leased jobs not started yet, in the order they came, with the counts and node sums
    the credit needs kept as jobs come and go: a credit is asked for at every wake-up and
    up to PREFETCH_MAX jobs wait here (held ahead), so it must not walk them."""

    def __init__(self) -> None:
        self.jobs: dict[int, LocalJob] = {}
        self.ahead = 0  # held ahead (still runnable on the server)
        self.ahead_nodes = 0.0
        self.leased_nodes = 0.0  # the others: RUNNING on the server, about to be placed

    def __len__(self) -> int:
        return len(self.jobs)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self.jobs

    def __iter__(self):
        return iter(self.jobs)

    @property
    def leased(self) -> int:
        return len(self.jobs) - self.ahead

    def add(self, job: LocalJob) -> None:
        self.jobs[job.id] = job
        if job.held_ahead:
            self.ahead += 1
            self.ahead_nodes += job.footprint
        else:
            self.leased_nodes += job.footprint

    def put_back(self, job: LocalJob) -> None:
        """A job taken back before it started: first in line again."""
        self.add(job)
        self.jobs = {job.id: job, **self.jobs}  # the first key keeps its place

    def pop(self, job_id: int) -> LocalJob:
        job = self.jobs.pop(job_id)
        if job.held_ahead:
            self.ahead -= 1
            # Exact again whenever none is left: float sums of 1/3s would drift otherwise.
            self.ahead_nodes = self.ahead_nodes - job.footprint if self.ahead else 0.0
        else:
            self.leased_nodes = self.leased_nodes - job.footprint if len(self.jobs) > self.ahead else 0.0
        return job


# Short jobs: hold enough ahead to keep every slot busy this long, so the slots do not
# wait for leases while reports are paced (session.REPORT_INTERVAL_S) and acknowledged.
PREFETCH_HORIZON_S = 0.25
# At most this many held ahead, however short the jobs and many the slots. It was 256: two
# slots of no-op jobs (~1.4 ms each) then held 0.18 s of work, and the refill asked for
# at half of that (90 ms) came behind a report the busy server took 60-120 ms to apply,
# so the slots ran dry a few times per 1,000 jobs; the horizon is the bound meant.
PREFETCH_MAX = 1024
# The horizon grows with how long the latest refills took to arrive: the refill is asked
# for once half of the held jobs are gone, so half the horizon must cover the wait, twice
# over (a busy server applies the report in flight before it leases). With a fixed
# quarter second, bench_e2e on PostgreSQL had two or three spells of 20-75 ms per 1,000
# no-op jobs with both slots idle (none with 1,000 held ahead). The longest wait counts,
# decaying by REFILL_DECAY at each refill. A wait also counts when the server simply had
# no job to lease, so the horizon stops at PREFETCH_HORIZON_MAX_S: at most a second of
# work is kept from the site's other pilots, and it comes down again as refills come fast.
REFILL_SLACK = 4.0
REFILL_DECAY = 0.8
PREFETCH_HORIZON_MAX_S = 1.0
# Weight of the newest run in the running mean of how long a job holds its slot.
RUN_TIME_WEIGHT = 0.05
# Jobs that hold their slot this long or less, on average, are placed to follow a running
# job on its CPUs (NodeManager.follow): the spawner thread starts one the moment the one it
# follows ends. Through this loop (SIGCHLD, reap, place, hand to the spawner thread) a slot
# of a 2-CPU node sat idle 0.76 ms (median) between one no-op job's exit and the next's
# start, as long as the job itself ran. A follower is reported RUNNING when it is placed,
# at most FOLLOW_WAIT_MAX_S early.
FOLLOW_MAX_RUN_S = 0.05
# A job is followed only while its run so far is this short, and a follower whose
# predecessor runs longer is taken back (never started) and placed as any queued job: a
# long or hung job in a mix of short ones holds up no other job.
FOLLOW_WAIT_MAX_S = 0.5


def auto_prefetch(slots: int, mean_run_s: float | None = None, refill_s: float = 0.0) -> int:
    """Jobs held ahead by default: enough to keep every slot busy for PREFETCH_HORIZON_S,
    or REFILL_SLACK times the refill wait `refill_s` when longer (up to
    PREFETCH_HORIZON_MAX_S), at most PREFETCH_MAX, none until a run time is known. A held
    job waits here while another pilot of the site may idle (XPCS compare runs: a new
    1-node pilot that held 8 ahead ran 7 of a burst's datasets in a row while its site's
    other 3 nodes had none), and a job that runs longer than the horizon gains nothing
    from being held: the lease round trip after it ends is milliseconds. Short jobs pay
    one round trip at the start, then hold hundreds."""
    if mean_run_s is None:
        return 0
    horizon = max(PREFETCH_HORIZON_S, min(PREFETCH_HORIZON_MAX_S, REFILL_SLACK * refill_s))
    return min(PREFETCH_MAX, int(slots * horizon / max(mean_run_s, 1e-4)))


class Wakeup:
    """The master loop's wake-up: asyncio.Event's set/clear/is_set, and a wait with a
    timeout for its one waiter that costs a future. The loop waits about twice per job;
    wait_event (asyncio.timeout around Event.wait) cost three times as much. The timer of a
    wait serves the next waits too while it is due no later than they must end (it may wake
    one of them early, which the loop takes as any wake-up): a timer made and cancelled per
    wait was a fifth of the wait's cost."""

    __slots__ = ("_set", "_waiter", "_timer")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def set(self) -> None:
        self._set = True
        self._resolve()

    def _resolve(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Until set() or `timeout` seconds pass (or, at most once per timer, sooner)."""
        if self._set:
            return
        due = loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            timer = self._timer = loop.call_at(due, self._expire)
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _expire(self) -> None:
        self._timer = None
        self._resolve()

    def cancel(self) -> None:
        """Drop the pending timer (the loop is done waiting)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _no_op(_signum: int, _frame: object) -> None:
    """The Python-level handler: the signal's number reaches the loop by the wake-up socket."""


class SignalReader:
    """Signals handled in the loop, read from a socket of their own. asyncio's
    add_signal_handler runs a handler two turns of the loop after its signal: it reads the
    signal's number from its self-pipe, queues the handler and writes to the pipe again, then
    reads it once more, two of its four reads failing with EAGAIN. A launcher of short jobs
    takes a SIGCHLD per job: here the handler runs in the turn that reads the number, with one
    read. Main thread only (signal.set_wakeup_fd); close() puts back what was there."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handlers: dict[int, Callable[[], None]]) -> None:
        self._loop = loop
        self._handlers = handlers
        self._read_sock, self._write_sock = socket.socketpair()
        self._read_sock.setblocking(False)
        self._write_sock.setblocking(False)
        self._old_handlers: dict[int, Any] = {}
        self._old_fd: int | None = None
        try:
            self._old_fd = signal.set_wakeup_fd(self._write_sock.fileno(), warn_on_full_buffer=False)
            for sig in handlers:
                self._old_handlers[sig] = signal.signal(sig, _no_op)
                signal.siginterrupt(sig, False)  # SA_RESTART, as asyncio sets it
            loop.add_reader(self._read_sock.fileno(), self._read)
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        try:
            data = self._read_sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for sig in set(data):  # a signal that came twice is handled once, as asyncio's would be
            handler = self._handlers.get(sig)
            if handler is not None:
                handler()

    def close(self) -> None:
        self._loop.remove_reader(self._read_sock.fileno())
        for sig, old in self._old_handlers.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._old_handlers.clear()
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
            self._old_fd = None
        self._read_sock.close()
        self._write_sock.close()


@dataclass
class Counters:
    started: int = 0
    done: int = 0
    errors: int = 0
    timeouts: int = 0
    retried: int = 0
    killed: int = 0
    unrunnable: int = 0
    by_state: dict[str, int] = field(default_factory=dict)


def allocation_margins(wall_time_s: float) -> tuple[float, float]:
    """(seconds before the end to stop taking work, seconds before the end to time out what
    runs): a tenth / a twentieth of the allocation, at most 2 min / 30 s."""
    return min(120.0, wall_time_s * 0.10), min(30.0, wall_time_s * 0.05)


class Master:
    def __init__(self, cfg: LauncherConfig, nodes: list[NodeSpec], dispatcher: Dispatcher,
                 channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], ctx: RunContext) -> None:
        self.cfg = cfg
        self.nodes = nodes
        self.manager = NodeManager(nodes, mpi_mode=cfg.mode == "mpi")
        self.dispatcher = dispatcher
        self.ctx = ctx
        self.jobs: dict[int, LocalJob] = {}
        self.queue = JobQueue()
        self.unfit: list[int] = []  # queued jobs that can never run here, to report
        self.counters = Counters()
        self.wake = Wakeup()
        self._credit_key: tuple | None = None  # the inputs of the last credit built, and it
        self._credit_msg = pb.SessionCredit()
        self.stopping = ""
        self.t0 = time.monotonic()
        self.end = self.t0 + cfg.wall_time_min * 60 if cfg.wall_time_min > 0 else math.inf
        stop_margin, kill_margin = allocation_margins(cfg.wall_time_min * 60)
        self.stop_new_at = self.end - stop_margin
        self.kill_at = self.end - kill_margin
        self.idle_since = time.monotonic()
        self.slots = self.manager.capacity().max_jobs
        self.mean_run_s: float | None = None  # how long a job holds its slot (running mean)
        # Jobs started here that a queued job may follow (ordered), the follower of each, and
        # the followers being taken back (their predecessor ran too long).
        self._followable: dict[int, None] = {}
        self._follower_of: dict[int, int] = {}
        self._withdrawing: set[int] = set()
        self.clock = time.monotonic
        self.prefetch = cfg.lease_prefetch if cfg.lease_prefetch >= 0 else auto_prefetch(self.slots)
        # How long the latest refills of held jobs took to arrive (REFILL_SLACK), and since
        # when the one wanted now has been.
        self.refill_s = 0.0
        self._refill_since: float | None = None
        self.client = SessionClient(channel, metadata, Callbacks(
            open_message=self._open_message, credit=self._credit, on_opened=self._on_opened,
            on_leases=self._on_leases, on_kill=self._on_kill, on_rejection=self._on_rejection,
            on_session_lost=self._on_session_lost, busy=self._busy))

    # -- session callbacks ----------------------------------------------------------------

    def _open_message(self) -> pb.SessionOpen:
        mode = common_pb2.JOB_MODE_SERIAL if self.cfg.mode == "serial" else common_pb2.JOB_MODE_MPI
        return pb.SessionOpen(site_id=self.cfg.site_id, batch_job_id=self.cfg.batch_job_id, job_mode=mode,
                              nodes=[session_pb2.NodeInfo(hostname=n.hostname, cpus=n.cpus, gpus=n.gpus)
                                     for n in self.nodes],
                              hostname=socket.gethostname(), launcher_version=VERSION)

    def _credit(self) -> pb.SessionCredit:
        now = time.monotonic()
        if self.stopping or now >= self.stop_new_at:
            return self._credit_of((0,))
        cap = self.manager.capacity()
        queue = self.queue
        max_jobs = cap.max_jobs - queue.leased
        free_nodes = cap.free_nodes - queue.leased_nodes
        # Held ahead (prefetch): up to `prefetch` jobs of at most a node each, left in their
        # runnable state on the server until started here, so a freed slot starts the next
        # job without a round trip. Asked for again only once half are gone, so the server
        # leases them in batches.
        reserve_jobs = 0
        reserve_nodes = 0.0
        if self.prefetch and queue.ahead <= self.prefetch // 2:
            reserve_jobs = self.prefetch - queue.ahead
            reserve_nodes = self.prefetch - queue.ahead_nodes
            if self._refill_since is None:
                self._refill_since = self.clock()
        if self.cfg.max_jobs:
            max_jobs = min(max_jobs, self.cfg.max_jobs - len(self.jobs))
            reserve_jobs = min(reserve_jobs, self.cfg.max_jobs - len(self.jobs) - max(0, max_jobs))
        if max_jobs <= 0 or free_nodes <= 1e-9:
            max_jobs, free_nodes = 0, 0.0
        if reserve_jobs <= 0 or reserve_nodes <= 1e-9:
            reserve_jobs, reserve_nodes = 0, 0.0
        if not max_jobs and not reserve_jobs:
            return self._credit_of((0,))
        remaining = 0
        if self.end < math.inf:
            remaining = max(1, int((self.stop_new_at - now) // 60))
        return self._credit_of((max_jobs, free_nodes, cap.max_nodes_per_job, remaining, reserve_jobs, reserve_nodes))

    def _credit_of(self, key: tuple) -> pb.SessionCredit:
        """The credit for these figures: the last one built while they stay the same (the
        session asks at every wake-up; building the message is most of the cost), so the
        same object means the same credit."""
        if key != self._credit_key:
            if len(key) == 1:
                msg = pb.SessionCredit(max_jobs=0)
            else:
                max_jobs, free_nodes, max_nodes, remaining, reserve_jobs, reserve_nodes = key
                msg = pb.SessionCredit(max_jobs=max_jobs, free_nodes=free_nodes, max_nodes_per_job=max_nodes,
                                       wall_time_remaining_min=remaining, serial_only=self.cfg.mode == "serial",
                                       filter_tags=self.cfg.credit_tags, app_ids=self.cfg.app_ids,
                                       reserve_jobs=reserve_jobs, reserve_nodes=reserve_nodes)
            self._credit_key, self._credit_msg = key, msg
        return self._credit_msg

    def _on_opened(self, opened: pb.SessionOpened, resumed: bool) -> None:
        held = {lj.job.id: lj for lj in opened.leased_jobs}
        if not resumed:
            self._drop_all("a new session replaces the old one")
        else:
            for job_id in list(self.jobs):
                if job_id not in held:
                    self._drop(job_id, "the server no longer holds it for this session")
        for job_id, lj in held.items():
            if job_id not in self.jobs and job_id not in self.client.outbox.pending_job_ids():
                self._add(lj)
        log.info("session opened" if not resumed else "session resumed", session=opened.session.id,
                 lease_timeout_s=opened.lease_timeout_seconds, held=len(held),
                 applied_through_seq=opened.applied_through_seq)
        self.wake.set()

    def _on_leases(self, leases: pb.JobLeases) -> None:
        if self._refill_since is not None and leases.jobs:
            self.refill_s = max(self.clock() - self._refill_since, REFILL_DECAY * self.refill_s)
            self._refill_since = None
            self._update_prefetch()
        for lj in leases.jobs:
            known = self.jobs.get(lj.job.id)
            if known is not None:
                known.leased.lease_generation = lj.lease_generation
                known.leased.job_token = lj.job_token  # the old one ended with the old lease
                continue
            self._add(lj)
        self.wake.set()

    def _update_prefetch(self) -> None:
        """The automatic hold (no --lease-prefetch) after a new run time or refill wait."""
        if self.cfg.lease_prefetch < 0:
            self.prefetch = auto_prefetch(self.slots, self.mean_run_s, self.refill_s)

    def _on_kill(self, kill: pb.KillJobs) -> None:
        for job_id in kill.job_ids:
            self._drop(job_id, kill.reason or "the server asked")
        self.wake.set()

    def _on_rejection(self, rej: pb.TransitionRejection) -> None:
        log.warning("transition refused", job_id=rej.job_id, seq=rej.seq, code=rej.code, reason=rej.reason,
                    message=rej.message)
        self._drop(rej.job_id, f"the server refused its transition: {rej.reason}")
        self.wake.set()

    def _on_session_lost(self, why: str) -> None:
        log.error("session lost; stopping its jobs and opening a new session", why=why)
        self._drop_all(why)
        self._refill_since = None  # the outage is not a refill's wait
        self.wake.set()

    # -- jobs -----------------------------------------------------------------------------

    def _add(self, lj: pb.LeasedJob) -> None:
        res = Resources.from_pb(lj.job.resources)
        job = LocalJob(lj, res, unfit=self.manager.never_fits(res), footprint=float(res.occupancy * res.num_nodes))
        self.jobs[job.id] = job
        self.queue.add(job)
        if job.unfit:
            self.unfit.append(job.id)

    def _drop(self, job_id: int, why: str) -> None:
        """Stop a job without reporting anything (the server moved it on already)."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job_id in self.queue:
            self.queue.pop(job_id)
            del self.jobs[job_id]
            return
        log.info("killing job", job_id=job_id, why=why)
        self.counters.killed += 1
        self.dispatcher.kill(job_id, "killed", why)

    def _drop_all(self, why: str) -> None:
        for job_id in list(self.jobs):
            self._drop(job_id, why)

    def _report(self, job: LocalJob, tr: pb.JobTransition) -> None:
        name = _STATE_NAMES[tr.state]
        self.counters.by_state[name] = self.counters.by_state.get(name, 0) + 1
        self.client.report(tr)

    def _start_on_server(self, job: LocalJob) -> None:
        """A job held ahead becomes RUNNING on the server by this report, which goes before
        its outcome's (any outcome but RUNNING is refused for a job not RUNNING)."""
        if job.held_ahead:
            self._report(job, transition(job.leased, job_pb2.JOB_STATE_RUNNING, message="started"))
            job.leased.job.state = job_pb2.JOB_STATE_RUNNING

    def _schedule(self) -> None:
        for job_id in self.unfit:
            if job_id not in self.queue:
                continue  # dropped meanwhile
            job = self.queue.pop(job_id)
            del self.jobs[job_id]
            self.counters.unrunnable += 1
            log.warning("job can never run here", job_id=job_id, reason=job.unfit)
            self._start_on_server(job)
            self._report(job, transition(job.leased, job_pb2.JOB_STATE_RUN_ERROR,
                                         message=f"cannot run in this launcher: {job.unfit}"))
        self.unfit.clear()
        if self._follower_of:
            self._withdraw_late_followers()
        if self.queue and not self.manager.full():
            self._place()
        if self.queue and self._followable and self.mean_run_s is not None and self.mean_run_s <= FOLLOW_MAX_RUN_S:
            self._place_followers()
        self.client.wake()

    def _place(self) -> None:
        for job_id, job in list(self.queue.jobs.items()):
            placed = self.manager.assign(job_id, job.res)
            if placed is None:
                if self.manager.full():
                    break  # no job fits anywhere now
                continue
            self.queue.pop(job_id)
            direct = not job.res.needs_mpi_launch and self.dispatcher.has_runner(placed.nodes[0])
            spec = self._spec(job, placed, force_mpi_launch=not direct)
            if spec is None:
                continue
            self._start_on_server(job)
            job.started = self.clock()
            self.counters.started += 1
            failed = self.dispatcher.start(placed.nodes[0] if direct else None, spec)
            if failed is not None:
                self._finished(failed)
                continue
            if direct:
                self._followable[job_id] = None
            if self.manager.full():
                break

    def _spec(self, job: LocalJob, placed: Assignment, *, force_mpi_launch: bool) -> ProcessSpec | None:
        """The placed job's process, or None when its command cannot be built: then it ends
        RUN_ERROR here and now, and what it was given is released."""
        job.placed = placed
        try:
            return build_process_spec(job.leased, placed, [self.nodes[i].hostname for i in placed.nodes],
                                      self.ctx, force_mpi_launch=force_mpi_launch, res=job.res)
        except (BalsamError, ValueError) as exc:
            self.manager.release(job.id)
            del self.jobs[job.id]
            self._start_on_server(job)
            self._report(job, transition(job.leased, job_pb2.JOB_STATE_RUN_ERROR,
                                         message=f"cannot build the command: {exc}"))
            return None

    def _place_followers(self) -> None:
        """Queued jobs, first come first, each to follow a running job that needs what it
        needs (the same resources) on the CPUs it holds, if that one's run so far is short."""
        now = self.clock()
        for after in list(self._followable):
            if not self.queue:
                return
            job_id, job = next(iter(self.queue.jobs.items()))
            running = self.jobs.get(after)
            if running is not None and now - running.started >= FOLLOW_WAIT_MAX_S:
                del self._followable[after]  # a long run: nobody waits for it
                continue
            if running is None or running.res != job.res or not self.dispatcher.can_follow(after):
                continue
            placed = self.manager.follow(job_id, after)
            if placed is None:
                continue
            self.queue.pop(job_id)
            spec = self._spec(job, placed, force_mpi_launch=False)
            if spec is None:
                continue
            del self._followable[after]
            self._follower_of[after] = job_id
            self._start_on_server(job)
            self.counters.started += 1
            failed = self.dispatcher.start(placed.nodes[0], spec, after=after)
            if failed is not None:
                self._finished(failed)

    def _withdraw_late_followers(self) -> None:
        """Take back the followers whose predecessor has run FOLLOW_WAIT_MAX_S: they go back
        to the queue (_finished, outcome WITHDRAWN) unless their start began meanwhile."""
        now = self.clock()
        for after, job_id in self._follower_of.items():
            running = self.jobs.get(after)
            if (job_id not in self._withdrawing and running is not None
                    and now - running.started >= FOLLOW_WAIT_MAX_S and self.dispatcher.withdraw(job_id)):
                self._withdrawing.add(job_id)

    def _follow_due(self) -> float | None:
        """When the next follower is due to be taken back, if any waits."""
        due = [running.started + FOLLOW_WAIT_MAX_S for after, job_id in self._follower_of.items()
               if job_id not in self._withdrawing and (running := self.jobs.get(after)) is not None]
        return min(due) if due else None

    def _busy(self) -> bool:
        """Jobs run or wait here: more transitions are coming soon."""
        return bool(self.jobs)

    def _finished(self, result: ProcessResult) -> None:
        self._withdrawing.discard(result.job_id)
        if result.outcome == WITHDRAWN:
            self._put_back(result.job_id)
            return
        job = self.jobs.pop(result.job_id, None)
        if job is None:
            return
        self.manager.release(result.job_id)  # to its follower, if it has one
        self._followable.pop(result.job_id, None)
        follower = self.jobs.get(self._follower_of.pop(result.job_id, 0))
        now = self.clock()
        if follower is not None:
            follower.started = now  # about when it started: its slot's time counts from here
            self._followable[follower.id] = None  # followed in turn, now that it runs
        if job.started:
            held = now - job.started
            mean = self.mean_run_s
            self.mean_run_s = held if mean is None else mean + RUN_TIME_WEIGHT * (held - mean)
            self._update_prefetch()
        tr = outcome_transition(job.leased, result)
        if tr is not None:
            self._report(job, tr)
        self.client.wake()

    def _put_back(self, job_id: int) -> None:
        """A follower taken back before it started: first in the queue again, placed as any
        job (it is RUNNING on the server already: no second report)."""
        job = self.jobs.get(job_id)
        if job is None:
            return
        self.manager.release(job_id)  # a follower holds nothing of its own
        self._follower_of = {after: f for after, f in self._follower_of.items() if f != job_id}
        self._followable.pop(job_id, None)
        job.placed, job.started = None, 0.0
        self.counters.started -= 1
        self.queue.put_back(job)
        self.wake.set()

    # -- main loop ------------------------------------------------------------------------

    def request_stop(self, why: str) -> None:
        if not self.stopping:
            log.info("launcher stopping", why=why)
            self.stopping = why
        self.wake.set()

    def _stop_everything(self, reason_message: str) -> None:
        """Time out what runs (RUN_TIMEOUT, the app's timeout policy follows) and hand back
        what never started (RESTART_READY)."""
        self.unfit.clear()
        for job_id in list(self.queue):
            job = self.jobs.pop(job_id)
            self.queue.pop(job_id)
            if job.held_ahead:
                continue  # never RUNNING: the server releases it when the session closes
            self._report(job, transition(job.leased, job_pb2.JOB_STATE_RESTART_READY,
                                         message=f"not started: {reason_message}"))
        for job_id in list(self.jobs):
            self.dispatcher.kill(job_id, "timeout", reason_message)
        self.client.wake()

    def _check_clock(self, now: float) -> None:
        if now >= self.kill_at and self.jobs and not self.stopping:
            self.request_stop("the allocation ends (--wall-time)")
        if now >= self.stop_new_at and not self.jobs and not self.stopping:
            self.request_stop("the allocation ends (--wall-time)")
        if self.jobs:
            self.idle_since = now
        elif self.cfg.idle_timeout_s and now - self.idle_since >= self.cfg.idle_timeout_s and not self.stopping:
            self.request_stop(f"idle for {self.cfg.idle_timeout_s:g} s")

    def _progress(self) -> None:
        c = self.counters
        log.info("progress", running=len(self.jobs) - len(self.queue), queued=len(self.queue),
                 busy_nodes=self.manager.busy_nodes(), free_nodes=round(self.manager.free_node_fraction(), 3),
                 started=c.started, reported=c.by_state, killed=c.killed, outbox=len(self.client.outbox),
                 session=self.client.session_id)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = SignalReader(loop, {
            signal.SIGCHLD: self.wake.set,
            signal.SIGTERM: lambda: self.request_stop("signal SIGTERM"),
            signal.SIGINT: lambda: self.request_stop("signal SIGINT")})
        # A job's start goes on while this loop reaps, places and reports: the few it must
        # hear of at once (a failed start, a kill meanwhile) wake it.
        self.dispatcher.start_in_background(lambda: loop.call_soon_threadsafe(self.wake.set))
        client_task = asyncio.create_task(self.client.run(), name="session")
        next_progress = time.monotonic() + self.cfg.progress_interval_s
        stopped_jobs = False
        rc = 0
        try:
            while True:
                if client_task.done():
                    client_task.result()  # raises SessionFatal
                    break
                now = time.monotonic()
                for result in self.dispatcher.poll():
                    self._finished(result)
                if self.client.connected.is_set() and not self.stopping:
                    self._schedule()
                self._check_clock(now)
                if self.stopping and not stopped_jobs:
                    stopped_jobs = True
                    self._stop_everything(f"the launcher stopped: {self.stopping}")
                if self.stopping and not self.jobs:
                    break
                if now >= next_progress:
                    next_progress = now + self.cfg.progress_interval_s
                    if self.jobs or self.counters.started:
                        self._progress()
                await self.wake.wait(loop, self._tick(now))
                self.wake.clear()
            self._progress()
            self.client.close()
            done, _ = await asyncio.wait({client_task}, timeout=CLOSE_TIMEOUT_S)
            if not done:
                log.warning("session did not close in time", outbox=len(self.client.outbox))
        except Exception as exc:
            log.error("launcher failed", error=str(exc), kind=type(exc).__name__)
            rc = 1
        finally:
            if not client_task.done():
                client_task.cancel()
                # Reached only after a logged failure or close timeout: what the cancelled
                # session task raises on its way out adds nothing to that.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await client_task
            self.dispatcher.shutdown()
            signals.close()
            self.wake.cancel()
        return rc

    def _tick(self, now: float) -> float:
        timeout = IDLE_TICK_S
        deadline = self.dispatcher.next_deadline()
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - now))
        interval = self.dispatcher.poll_interval()
        if interval is not None:
            timeout = min(timeout, interval)
        for t in (self.stop_new_at, self.kill_at):
            if t > now:
                timeout = min(timeout, t - now)
        if self._follower_of and (due := self._follow_due()) is not None:
            timeout = min(timeout, due - now)
        return max(timeout, 0.0005)
