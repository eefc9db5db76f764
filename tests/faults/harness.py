"""Real processes for the fault suite: a server that can be killed and restarted on the
same port, launchers (killed as a whole node: the launcher and its job processes), site
daemons (`balsamctl site init/start`), an SDK watcher, and the audit that checks every
scenario's outcome against the server's event log and the jobs' own side effects.

Everything uses short timeouts (lease timeout, keepalive) from the environment and
settings, so a fault is noticed within seconds.
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil
import yaml

from balsam_grpc.sdk import Client, Event
from balsam_grpc.site.schedulers.local_state import read_record
from balsam_grpc.v1 import event_service_pb2, job_pb2, job_service_pb2
from tests.support.server_fork import shared_forker
from tests.support.cli_fork import BALSAMCTL, shared_cli_forker
from tests.support.server_proc import ServerProcess
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
J = job_pb2
FINAL = "JOB_FINISHED"

# Fault-suite timings (all through env/settings): a launcher stream gone for LEASE_TIMEOUT
# seconds loses its session; clients ping every 5 s (the least the server allows) and give
# up after 1.5 s; the server pings every 2 s and gives up after 2 s.
LEASE_TIMEOUT = 4
KEEPALIVE_ENV = {
    "BALSAM_KEEPALIVE_TIME_MS": "5000",
    "BALSAM_KEEPALIVE_TIMEOUT_MS": "1500",
    "BALSAM_SERVER_KEEPALIVE_TIME_MS": "2000",
    "BALSAM_SERVER_KEEPALIVE_TIMEOUT_MS": "2000",
}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (a node that died: its job
    processes, in sessions of their own, die with it)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


# ---------------------------------------------------------------------------- server
class ServerProc(ServerProcess):
    """The server with the fault suite's short lease timeout and keepalives, in a session
    of its own, forked from the run's server fork server (tests/support/server_fork.py:
    a second of CPU less per start, and the scenarios restart it)."""

    def __init__(self, home: Path, database_url: str, lease_timeout: int = LEASE_TIMEOUT) -> None:
        super().__init__(home, database_url, args=("--lease-timeout", str(lease_timeout)),
                         extra_env={"PYTHONPATH": str(REPO), **KEEPALIVE_ENV}, new_session=True,
                         forker=shared_forker())
        self.lease_timeout = lease_timeout


# ---------------------------------------------------------------------------- launchers
class LauncherProc:
    """A launcher (single process, serial mode) started as a real process."""

    def __init__(self, site_dir: Path, server: ServerProc, *args: str, address: str = "") -> None:
        env = dict(server.env)
        env.update(BALSAM_SERVER=address or server.address, BALSAM_TOKEN=server.token,
                   PATH=f"{VENV_BIN}:{env.get('PATH', '')}", BALSAM_LOG_LEVEL="INFO")
        self.log_path = site_dir / f"launcher-{secrets.token_hex(3)}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balsam_grpc.launcher", "--site-dir", str(site_dir), "--mode", "serial",
                 "--progress-interval", "1", *args],
                cwd=site_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_node(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                kill_tree(self.proc.pid)
                self.proc.wait(5)


# ---------------------------------------------------------------------------- sites
LEDGER_APPS = textwrap.dedent('''
    import os
    import time
    from pathlib import Path
    from balsam_grpc.core.appdef import ApplicationDefinition

    LEDGER = {ledger!r}

    def note(word):
        with open(LEDGER, "a") as fh:
            fh.write(f"{{word}} {{os.environ.get('BALSAM_JOB_ID', '')}}\\n")

    class Nap(ApplicationDefinition):
        """Appends 'start <id>' and 'end <id>' to the ledger around a nap."""
        command_template = ("echo start $BALSAM_JOB_ID >> {ledger}; sleep {{{{ secs }}}}; "
                            "echo end $BALSAM_JOB_ID >> {ledger}")
        shell = True  # values reach the script as "$1"; never pasted into it
        parameters = {{"secs": {{"default": "1"}}}}

    class Hooked(ApplicationDefinition):
        """Runs quickly; its postprocess hook naps (a hook to kill the daemon in) and
        appends 'post <job id>' to the hook ledger when it completes."""
        command_template = "/bin/sh -c 'echo start $BALSAM_JOB_ID >> {ledger}; echo end $BALSAM_JOB_ID >> {ledger}'"
        parameters = {{"delay": {{"default": "0"}}}}

        def postprocess(self):
            Path("hook-started").write_text("yes")
            time.sleep(float(self.job.parameters.get("delay", "0")))
            with open({hook_ledger!r}, "a") as fh:
                fh.write(f"post {{self.job.id}}\\n")
            self.job.data = {{**self.job.data, "post": "done"}}
''')


class SiteProc:
    """A site made by `balsamctl site init` whose daemon runs as a real process; its
    pilots run on the `local` scheduler. `address` routes the daemon (and the pilots it
    starts) through a proxy."""

    FAST: ClassVar[dict[str, Any]] = {
        "scheduler__poll_seconds": 1, "launcher__idle_timeout_s": 30, "elastic_queue__enabled": True,
        "elastic_queue__min_wall_time_min": 5, "elastic_queue__check_seconds": 1, "elastic_queue__max_nodes": 1}

    def __init__(self, tmp: Path, server: ServerProc, *, address: str = "", **changes: Any) -> None:
        self.server = server
        self.dir = tmp / "site"
        self.ledger = tmp / "ledger.txt"
        self.hook_ledger = tmp / "hooks.txt"
        self.env = dict(server.env)
        if address:
            self.env["BALSAM_SERVER"] = address
            self.env["BALSAM_TOKEN"] = server.token
        res = self.balsamctl("site", "init", str(self.dir), "--platform", "local", "--name",
                             f"faults-{secrets.token_hex(3)}")
        assert "created site" in res.stdout, res.stdout + res.stderr
        settings = yaml.safe_load((self.dir / "settings.yml").read_text())
        self.id = int(settings["site_id"])
        for dotted, value in {**self.FAST, **changes}.items():
            node = settings
            *parents, last = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        (self.dir / "settings.yml").write_text(yaml.safe_dump(settings, sort_keys=False))
        (self.dir / "apps" / "apps.py").write_text(LEDGER_APPS.format(ledger=str(self.ledger),
                                                                       hook_ledger=str(self.hook_ledger)))

    def balsamctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # Forked from a process that has imported the CLI (tests/support/cli_fork.py).
        res = shared_cli_forker().run(BALSAMCTL, args, env=self.env, timeout=timeout, cwd=self.dir.parent)
        if check and res.returncode != 0:
            raise AssertionError(f"balsamctl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def start(self) -> int:
        out = self.balsamctl("site", "start", str(self.dir), "--wait", "30")
        assert "connected" in out.stdout, out.stdout
        return self.pid()

    def pid(self) -> int:
        return int((self.dir / ".site.lock").read_text().strip())

    def kill9(self) -> None:
        """SIGKILL the daemon (its hook processes notice their parent died and exit;
        pilots, process groups of the local scheduler, run on)."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   "the daemon to die", 10)

    def scheduler_records(self) -> list[dict[str, Any]]:
        """The local scheduler's job records; not the empty placeholder of an id being
        allocated (a daemon stopped or killed mid-submit leaves one)."""
        state = self.dir / "state" / "local-scheduler"
        records = [read_record(p) for p in sorted(state.glob("*.json"))] if state.exists() else []
        return [r for r in records if r is not None]

    def log_tail(self, n: int = 40) -> str:
        path = self.dir / "logs" / "site.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self) -> None:
        if (self.dir / ".site.lock").exists():
            self.balsamctl("site", "stop", str(self.dir), "--force", "--timeout", "10", check=False)
        for rec in self.scheduler_records():
            pgid = rec.get("pgid") or rec.get("pid")
            if pgid:
                try:
                    os.killpg(int(pgid), signal.SIGKILL)
                except (ValueError, OSError):
                    pass


# ---------------------------------------------------------------------------- watcher
class Watcher:
    """An SDK watch of one site's events on its own thread, compared at the end with
    the server's event log: every event after its start exactly once, in order."""

    def __init__(self, client: Client, site_id: int) -> None:
        self.client = client
        self.site_id = site_id
        self.stream = client.watch(site=site_id)
        self.events: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()
        assert self.stream.wait_started(30), "the watch did not start"
        self.first_cursor = int(self.stream.cursor or 0)

    def _collect(self) -> None:
        try:
            for event in self.stream:
                self.events.put(event)
        except Exception as exc:  # noqa: BLE001 - surfaced by check()
            self.events.put(exc)

    def check(self, client: Client, timeout: float = 30) -> int:
        """Wait until the watcher has seen the whole log; assert exactly once, in order.
        Returns the number of events compared."""
        log_ids = [e.id for e in client.events.filter(site=self.site_id) if e.id > self.first_cursor]
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        while len(seen) < len(log_ids) and time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            assert isinstance(item, Event), f"the watch failed: {item!r}"
            seen.append(item)
        self.stream.close()
        self.thread.join(10)
        while not self.events.empty():
            item = self.events.get()
            if isinstance(item, Event):
                seen.append(item)
        seen_ids = [e.id for e in seen]
        assert seen_ids[:len(log_ids)] == log_ids, (
            f"watcher saw {len(seen_ids)} events, log has {len(log_ids)}; "
            f"missing {sorted(set(log_ids) - set(seen_ids))[:10]}, extra {sorted(set(seen_ids) - set(log_ids))[:10]}")
        assert len(seen_ids) == len(set(seen_ids)), "the watcher saw an event twice"
        return len(log_ids)


# ---------------------------------------------------------------------------- audit
def job_events(client: Client, ids: list[int]) -> list[Any]:
    stub = client.stub("EventService")
    out: list[Any] = []
    for start in range(0, len(ids), 500):
        token = ""
        while True:
            resp = stub.ListEvents(event_service_pb2.ListEventsRequest(
                filter=event_service_pb2.EventFilter(job_ids=ids[start:start + 500]), page_size=1000,
                page_token=token), metadata=client.metadata, timeout=30)
            out += list(resp.events)
            token = resp.next_page_token
            if not token:
                break
    return out


def list_jobs(client: Client, ids: list[int]) -> dict[int, Any]:
    stub = client.stub("JobService")
    found: dict[int, Any] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        resp = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=J.JobFilter(ids=chunk), page_size=len(chunk)),
                             metadata=client.metadata, timeout=30)
        found.update({j.id: j for j in resp.jobs})
    return found


def states(client: Client, ids: list[int]) -> Counter[str]:
    return Counter(J.JobState.Name(j.state).removeprefix("JOB_STATE_") for j in list_jobs(client, ids).values())


def wait_states(client: Client, ids: list[int], want: str, timeout: float,
                debug: Callable[[], str] | None = None) -> None:
    wait_until(lambda: states(client, ids) == Counter({want: len(ids)}), f"{len(ids)} jobs to reach {want}",
               timeout, interval=0.2,
               on_timeout=lambda: f"states: {dict(states(client, ids))}\n{debug() if debug else ''}")


def passed_through(event: Any, state: str) -> bool:
    """The event moved the job into `state`, directly or on the way (data.via)."""
    if event.WhichOneof("change") != "job_state":
        return False
    if J.JobState.Name(event.job_state.to_state) == f"JOB_STATE_{state}":
        return True
    via = event.data["via"] if "via" in event.data else []  # noqa: SIM401 - a Struct, not a dict
    return any(str(v).removeprefix("JOB_STATE_") == state for v in via)


def ledger_counts(path: Path | None) -> Counter[tuple[str, int]]:
    """(word, job id) -> lines in a ledger the jobs (or hooks) append to."""
    out: Counter[tuple[str, int]] = Counter()
    if path is None or not path.exists():
        return out
    for line in path.read_text().splitlines():
        word, _, job = line.partition(" ")
        if job.strip().isdigit():
            out[(word, int(job))] += 1
    return out


@dataclass
class Audit:
    """What the invariants found: jobs lost (missing, or not in the state the rules say)
    and jobs completed twice (more than one RUN_DONE or JOB_FINISHED event, or more
    completed runs in the ledger than runs the server counted)."""

    jobs: int
    lost: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.lost and not self.duplicates, "\n".join(self.details[:20])


def audit(client: Client, ids: list[int], ledger: Path | None, *, final: str = FINAL,
          hook_ledger: Path | None = None) -> Audit:
    result = Audit(jobs=len(ids))
    jobs = list_jobs(client, ids)
    events = job_events(client, ids)
    by_job: dict[int, list[Any]] = {i: [] for i in ids}
    for e in events:
        by_job.setdefault(e.job_id, []).append(e)
    runs = ledger_counts(ledger)
    hooks = ledger_counts(hook_ledger)
    for jid in ids:
        job = jobs.get(jid)
        state = J.JobState.Name(job.state).removeprefix("JOB_STATE_") if job else "MISSING"
        if state != final:
            result.lost.append(jid)
            result.details.append(f"job {jid}: {state}, expected {final}")
            continue
        evs = by_job.get(jid, [])
        done = sum(passed_through(e, "RUN_DONE") for e in evs)
        finished = sum(passed_through(e, "JOB_FINISHED") for e in evs)
        ends = runs[("end", jid)]
        if done != 1 or finished != 1 or (ledger is not None and not 1 <= ends <= job.run_count):
            result.duplicates.append(jid)
            result.details.append(f"job {jid}: RUN_DONE x{done}, JOB_FINISHED x{finished}, "
                                  f"ledger end x{ends}, run_count {job.run_count}")
        # A hook is at-least-once (a daemon killed mid-hook runs it again), its result is
        # applied once: the job passed POSTPROCESSED exactly once.
        post = sum(passed_through(e, "POSTPROCESSED") for e in evs)
        if hook_ledger is not None and (hooks[("post", jid)] < 1 or post != 1):
            result.duplicates.append(jid)
            result.details.append(f"job {jid}: postprocess ran x{hooks[('post', jid)]}, applied x{post}")
        ids_in_order = [e.id for e in evs]
        if ids_in_order != sorted(ids_in_order):
            result.details.append(f"job {jid}: events out of order")
            result.duplicates.append(jid)
    return result


def iter_chunks(items: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def launcher_site(server: ServerProc, client: Client, tmp: Path, secs: float = 3) -> tuple[Any, Path, Any, Path]:
    """A site directory with settings for a launcher, and an app that naps `secs` seconds
    and writes its start and end to the returned ledger file."""
    site_dir = tmp / "site"
    (site_dir / "apps").mkdir(parents=True)
    (site_dir / "data").mkdir()
    site = client.sites.create(name=f"lk-{secrets.token_hex(3)}", hostname="localhost", path=str(site_dir))
    (site_dir / "settings.yml").write_text(f"site_id: {site.id}\n")
    ledger = tmp / "ledger.txt"
    app = client.apps.create(site_id=site.id, name="nap", command_template=(
        f"/bin/sh -c 'echo start $BALSAM_JOB_ID >> {ledger}; sleep {secs}; echo end $BALSAM_JOB_ID >> {ledger}'"))
    return site, site_dir, app, ledger


def create_jobs(client: Client, n: int, prefix: str, **fields: Any) -> list[int]:
    """n jobs in one BatchCreateJobs call (a request_id: a retried call creates nothing twice)."""
    from balsam_grpc.sdk import Job

    jobs = [Job(_client=client, workdir=f"{prefix}/{i}-{secrets.token_hex(3)}", **fields) for i in range(n)]
    return [j.id for j in client.jobs.bulk_create(jobs)]


def last_event_id(client: Client) -> int:
    resp = client.stub("EventService").ListEvents(event_service_pb2.ListEventsRequest(page_size=1, descending=True),
                                                  metadata=client.metadata, timeout=30)
    return resp.events[0].id if resp.events else 0


def job_progress_after(client: Client, event_id: int) -> bool:
    """A job changed state after event `event_id` (work flows again)."""
    resp = client.stub("EventService").ListEvents(event_service_pb2.ListEventsRequest(page_size=1, descending=True),
                                                  metadata=client.metadata, timeout=30)
    return bool(resp.events) and resp.events[0].id > event_id and resp.events[0].WhichOneof("change") == "job_state"


def site_connected(client: Client, site_id: int) -> bool:
    return bool(client.sites.get(id=site_id).liveness.connected)
