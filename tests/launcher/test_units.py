"""Pure parts of the launcher: node lists, packing, MPI launch argv, the outbox, process
specs, outcomes, flags."""

from __future__ import annotations

import asyncio
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balsam_grpc.launcher import (
    bootstrap,
    config,
    launch_commands,
    nodes,
    outcomes,
    session,
)
from balsam_grpc.launcher.launch_commands import LaunchSpec, build_argv
from balsam_grpc.launcher.node_manager import NodeManager, Resources
from balsam_grpc.launcher.nodes import NodeSpec
from balsam_grpc.launcher.outbox import Outbox
from balsam_grpc.launcher.process_spec import (
    RunContext,
    build_process_spec,
)
from balsam_grpc.launcher.runner import ProcessResult, job_base_environment
from balsam_grpc.v1 import app_pb2, job_pb2, session_service_pb2

S = job_pb2

# -- node discovery ------------------------------------------------------------------------


def test_slurm_nodelist_ranges_padding_and_plain_names():
    assert nodes.expand_slurm_nodelist("nid[0001-0003,0007],gpu1") == ["nid0001", "nid0002", "nid0003", "nid0007",
                                                                      "gpu1"]
    assert nodes.expand_slurm_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert nodes.expand_slurm_nodelist("login1") == ["login1"]


@pytest.mark.parametrize("bad", ["nid[1-", "nid]1[", "nid[3-1]", "nid[a-b]"])
def test_slurm_nodelist_errors_are_value_errors(bad):
    with pytest.raises(ValueError):
        nodes.expand_slurm_nodelist(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="nid0123456789[],-x", max_size=30))
def test_slurm_nodelist_fuzz_never_crashes_otherwise(text):
    try:
        hosts = nodes.expand_slurm_nodelist(text, limit=1000)
    except ValueError:
        return
    assert all(isinstance(h, str) and h for h in hosts) and len(hosts) <= 1000


def test_pbs_cobalt_lsf_and_scheduler_choice():
    assert nodes.parse_host_file("x1\nx1\nx2\n# comment\n\nx3\n") == ["x1", "x2", "x3"]
    assert nodes.parse_cobalt_partname("3824-3826,12") == ["nid03824", "nid03825", "nid03826", "nid00012"]
    assert nodes.parse_lsf_hostfile("batch1\nh1\nh1\nh2\n") == ["h1", "h2"]
    files = {"/pbs": "a\nb\n", "/lsf": "launch\nc\n"}
    read = files.__getitem__
    assert nodes.scheduler_hosts({"SLURM_JOB_NODELIST": "n[1-2]"}, read) == ("slurm", ["n1", "n2"])
    assert nodes.scheduler_hosts({"PBS_NODEFILE": "/pbs"}, read) == ("pbs", ["a", "b"])
    assert nodes.scheduler_hosts({"COBALT_PARTNAME": "5"}, read) == ("cobalt", ["nid00005"])
    assert nodes.scheduler_hosts({"LSB_DJOB_HOSTFILE": "/lsf"}, read) == ("lsf", ["c"])
    assert nodes.scheduler_hosts({}, read) == ("local", [])


def test_gpu_count_and_platform_presets(tmp_path):
    assert nodes.count_gpus_from_nvidia_smi("GPU 0: A100 (UUID: x)\nGPU 1: A100 (UUID: y)\n") == 2
    assert nodes.count_gpus_from_nvidia_smi("") == 0
    polaris = nodes.load_platform("polaris")
    assert (polaris.cpus_per_node, polaris.gpus_per_node, polaris.mpi_flavor) == (32, 4, "pals")
    (tmp_path / "platforms").mkdir()
    (tmp_path / "platforms" / "mine.yml").write_text("cpus_per_node: 8\ngpus_per_node: 2\nmpi_flavor: slurm\n")
    mine = nodes.load_platform("mine", tmp_path)
    assert nodes.node_specs(["a", "b"], mine) == [NodeSpec("a", 8, 2), NodeSpec("b", 8, 2)]
    assert nodes.node_specs(["a"], mine, cpus=64, gpus=0) == [NodeSpec("a", 64, 0)]
    with pytest.raises(ValueError, match="unknown platform"):
        nodes.load_platform("nope")


def test_single_process_node_plan(tmp_path):
    cfg = config.LauncherConfig(mode="mpi", site_dir=tmp_path, site_id=1, cpus_per_node=4, gpus_per_node=0)
    plat = nodes.load_platform("local")
    specs, local = bootstrap.plan_single_process_nodes(cfg, {"SLURM_JOB_NODELIST": "n[1-3]"}, "n2.cluster", plat)
    assert [s.hostname for s in specs] == ["n1", "n2", "n3"] and local == 1
    specs, local = bootstrap.plan_single_process_nodes(cfg, {"SLURM_JOB_NODELIST": "n[1-3]"}, "mom1", plat)
    assert local is None
    cfg.mode = "serial"
    specs, local = bootstrap.plan_single_process_nodes(cfg, {"SLURM_JOB_NODELIST": "n[1-3]"}, "n2", plat)
    assert [s.hostname for s in specs] == ["n2"] and local == 0
    assert bootstrap.mpi_world_size({"PMI_SIZE": "4"}) == 4 and bootstrap.mpi_world_size({}) == 1


# -- node manager --------------------------------------------------------------------------


def nm(n=2, cpus=4, gpus=2, mpi=True):
    return NodeManager([NodeSpec(f"h{i}", cpus, gpus) for i in range(n)], mpi_mode=mpi)


def test_packing_by_occupancy_then_next_node():
    m = nm(n=2, cpus=8)
    r = Resources(node_packing_count=3)
    placed = [m.assign(i, r) for i in range(6)]
    assert [p.nodes for p in placed] == [[0], [0], [0], [1], [1], [1]]
    assert m.assign(99, r) is None  # three thirds fill a node exactly
    m.release(1)
    assert m.assign(99, r).nodes == [0]


def test_packing_by_cpus_and_gpus_with_distinct_ids():
    m = nm(n=1, cpus=4, gpus=2)
    r = Resources(node_packing_count=8, threads_per_rank=2, gpus_per_rank=1)
    a, b = m.assign(1, r), m.assign(2, r)
    assert a.cpu_ids == [[0, 1]] and b.cpu_ids == [[2, 3]] and a.gpu_ids == [[0]] and b.gpu_ids == [[1]]
    assert m.assign(3, Resources(node_packing_count=8)) is None  # no CPU left though occupancy is
    m.release(1)
    assert m.assign(3, Resources(node_packing_count=8)).cpu_ids == [[0]]


def test_multi_node_jobs_take_whole_idle_nodes():
    m = nm(n=3)
    m.assign(1, Resources(node_packing_count=4))
    big = m.assign(2, Resources(num_nodes=2, ranks_per_node=2))
    assert big.nodes == [1, 2]
    assert m.assign(3, Resources(num_nodes=2)) is None
    cap = m.capacity()
    assert cap.max_nodes_per_job == 1 and cap.free_nodes == pytest.approx(0.75)


def test_never_fits_has_a_reason():
    assert "serial mode" in nm(mpi=False).never_fits(Resources(ranks_per_node=2))
    assert "allocation has 2" in nm().never_fits(Resources(num_nodes=3))
    assert "CPUs per node" in nm(cpus=4).never_fits(Resources(ranks_per_node=2, threads_per_rank=4))
    assert "GPUs" in nm(gpus=2).never_fits(Resources(gpus_per_rank=3))
    assert nm().never_fits(Resources(num_nodes=2, ranks_per_node=4)) is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.booleans()), max_size=40))
def test_packing_never_oversubscribes(ops):
    m = nm(n=3, cpus=6, gpus=2)
    live = []
    for i, (nodes_, packing, threads, release) in enumerate(ops):
        if release and live:
            m.release(live.pop(0))
        if m.assign(i, Resources(num_nodes=nodes_, node_packing_count=packing, threads_per_rank=threads)):
            live.append(i)
        for node in m.nodes:
            assert node.occupancy <= 1 and len(node.free_cpus) == len(set(node.free_cpus)) <= 6
        held = [c for a in m.assignments.values() for node_cpus in a.cpu_ids for c in node_cpus]
        assert sum(len(n.free_cpus) for n in m.nodes) + len(held) == 18
        usable = [n for n in m.nodes if n.free_cpus and n.occupancy < 1]
        cap = m.capacity()  # kept between changes, summed in integers: as a Fraction recount
        assert cap.free_nodes == float(sum((1 - n.occupancy for n in usable), Fraction(0)))
        assert m.full() == (not usable) and cap.max_jobs == sum(len(n.free_cpus) for n in usable)
        assert m.free_node_fraction() == float(sum((1 - n.occupancy for n in m.nodes), Fraction(0)))


def test_a_follower_takes_over_what_the_job_it_follows_held_when_that_one_is_released():
    m = nm(n=1, cpus=2)
    res = Resources(node_packing_count=2)
    a, b = m.assign(1, res), m.assign(2, res)
    assert a is not None and b is not None and m.full()
    follower = m.follow(3, after=1)
    assert follower is not None and (follower.nodes, follower.cpu_ids) == (a.nodes, a.cpu_ids)
    assert m.follow(4, after=1) is None  # one follower each
    assert m.follow(4, after=3) is None  # 3 holds nothing yet
    assert m.full() and 3 not in m.assignments
    m.release(1)
    assert m.assignments[3].cpu_ids == a.cpu_ids and m.full()  # handed over, nothing freed
    assert m.follow(4, after=3) is not None
    m.release(4)  # a follower that ends before its job: it held nothing
    m.release(3)
    assert not m.full() and m.nodes[0].free_cpus == a.cpu_ids[0]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.integers(0, 30)), max_size=60))
def test_following_never_oversubscribes_nor_loses_a_cpu(ops):
    """Assign, follow a held job, release any job (held, following or unknown), in any order."""
    m = nm(n=2, cpus=4)
    for i, (op, packing, pick) in enumerate(ops):
        if op == 0:
            m.assign(i, Resources(node_packing_count=packing))
        elif op == 1 and m.assignments:
            m.follow(i, after=sorted(m.assignments)[pick % len(m.assignments)])
        else:
            known = sorted({*m.assignments, *(f.job_id for f in m.followers.values())})
            m.release(known[pick % len(known)] if known else pick)
        held = [c for a in m.assignments.values() for node_cpus in a.cpu_ids for c in node_cpus]
        free = [c for n in m.nodes for c in n.free_cpus]
        assert len(held) + len(free) == 8
        for node_index, node in enumerate(m.nodes):
            mine = [c for a in m.assignments.values() for ni, cs in zip(a.nodes, a.cpu_ids, strict=True)
                    if ni == node_index
                    for c in cs]
            assert sorted(mine + node.free_cpus) == list(range(4))
            assert node.jobs == {a.job_id for a in m.assignments.values() if node_index in a.nodes}
        for after, follower in m.followers.items():
            assert after in m.assignments and follower.cpu_ids == m.assignments[after].cpu_ids
        cap = m.capacity()
        usable = [n for n in m.nodes if n.free_cpus and n.occupancy < 1]
        assert cap.max_jobs == sum(len(n.free_cpus) for n in usable)


def test_free_nodes_are_summed_exactly():
    """Ten nodes nine tenths full free exactly one node: a float sum falls short of it. So do
    three nodes two thirds full, after packings of 10 and 3 made the unit a thirtieth."""
    assert sum([0.1] * 10) < 1.0
    m = nm(n=10, cpus=10, gpus=0)
    for i in range(100):  # node k holds jobs 10k..10k+9
        assert m.assign(i, Resources(node_packing_count=10)).nodes == [i // 10]
    for i in range(0, 100, 10):
        m.release(i)
    assert m.capacity().free_nodes == 1.0 and m.free_node_fraction() == 1.0
    m = nm(n=3, cpus=10, gpus=0)
    m.assign(0, Resources(node_packing_count=10))
    m.release(0)
    for i in range(9):
        assert m.assign(i, Resources(node_packing_count=3)).nodes == [i // 3]
    for i in (0, 3, 6):
        m.release(i)
    assert m.capacity().free_nodes == 1.0 and m.unit == 30 and m.nodes[0].occupancy == Fraction(2, 3)
    assert nm(n=2).capacity().free_nodes == 2.0


# -- MPI launch argv -----------------------------------------------------------------------

SPEC = LaunchSpec(hosts=["n1", "n2"], ranks_per_node=2, threads_per_rank=2, gpus_per_rank=1,
                  cpu_ids=[[0, 1, 2, 3], [0, 1, 2, 3]], env={"OMP_NUM_THREADS": "2", "A": "b c"},
                  launch_params={"verbose": ""}, executable="/opt/mpiexec")


def test_mpich_argv():
    assert build_argv("mpich", SPEC, ["app", "-x"]) == [
        "/opt/mpiexec", "-n", "4", "-ppn", "2", "-hosts", "n1,n2", "-bind-to", "user:0+1,2+3",
        "-genv", "A", "b c", "-genv", "OMP_NUM_THREADS", "2", "--verbose", "app", "-x"]


def test_pals_argv():
    assert build_argv("pals", SPEC, ["app"]) == [
        "/opt/mpiexec", "-n", "4", "--ppn", "2", "--hosts", "n1,n2", "--depth", "2", "--cpu-bind", "list:0-1:2-3",
        "--env", "A=b c", "--env", "OMP_NUM_THREADS=2", "--verbose", "app"]


def test_openmpi_argv():
    spec = LaunchSpec(hosts=["n1"], ranks_per_node=3, env={"X": "1"}, launch_params={"oversubscribe": ""})
    assert build_argv("openmpi", spec, ["app"]) == [
        "mpirun", "-np", "3", "--host", "n1:3", "--map-by", "ppr:3:node:PE=1", "-x", "X=1", "--oversubscribe",
        "app"]


def test_slurm_argv_exact_overlap_binding_and_export():
    assert build_argv("slurm", SPEC, ["app"]) == [
        "/opt/mpiexec", "--ntasks=4", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=2",
        "--nodelist=n1,n2", "--exact", "--gpus-per-task=1", "--cpu-bind=mask_cpu:0x3,0xc",
        "--export=ALL,A=b c,OMP_NUM_THREADS=2", "--verbose", "app"]
    packed = LaunchSpec(hosts=["n1"], ranks_per_node=2, cpu_ids=[[4, 5]], shares_nodes=True,
                        launch_params={"mpi": "pmi2"})
    assert build_argv("slurm", packed, ["app"]) == [
        "srun", "--ntasks=2", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--nodelist=n1", "--exact",
        "--overlap", "--cpu-bind=map_cpu:4,5", "--export=ALL", "--mpi=pmi2", "app"]


def test_aprun_and_jsrun_argv():
    spec = LaunchSpec(hosts=["nid00012", "nid00013"], ranks_per_node=4, threads_per_rank=4, threads_per_core=2,
                      env={"K": "v"})
    assert build_argv("aprun", spec, ["app"]) == [
        "aprun", "-n", "8", "-N", "4", "-d", "2", "-j", "2", "-cc", "depth", "-L", "12,13", "-e", "K=v", "app"]
    assert build_argv("jsrun", SPEC, ["app"]) == [
        "/opt/mpiexec", "--nrs", "4", "--tasks_per_rs", "1", "--cpu_per_rs", "2", "--gpu_per_rs", "1",
        "--rs_per_host", "2", "--bind", "packed:2", "--launch_distribution", "packed", "-E", "A=b c",
        "-E", "OMP_NUM_THREADS=2", "--verbose", "app"]


def test_cpu_bind_param_overrides_and_unknown_flavor():
    spec = LaunchSpec(hosts=["n1"], cpu_ids=[[0]], launch_params={"cpu-bind": "core"})
    assert build_argv("mpich", spec, ["a"])[7:9] == ["-bind-to", "core"]
    with pytest.raises(ValueError, match="unknown MPI launcher"):
        build_argv("mvapich9", spec, ["a"])
    with pytest.raises(TypeError, match="argument vector"):  # a command line would be re-split
        build_argv("mpich", spec, "a --title 'x y'")
    assert launch_commands._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


# -- outbox --------------------------------------------------------------------------------


def tr(job_id=1):
    return session_service_pb2.JobTransition(job_id=job_id, state=S.JOB_STATE_RUN_DONE)


def test_outbox_numbers_acks_and_resends_after_reconnect():
    box = Outbox()
    assert [box.add(tr(i)) for i in range(5)] == [1, 2, 3, 4, 5]
    assert [t.seq for t in box.take_unsent(3)] == [1, 2, 3]
    assert [t.seq for t in box.take_unsent()] == [4, 5] and not box.has_unsent()
    assert [t.seq for t in box.ack(2)] == [1, 2] and len(box) == 3
    box.rewind(3)  # reconnect: the server had applied through 3
    assert [t.seq for t in box.take_unsent()] == [4, 5]
    box.add(tr(9))
    box.rewind(3)
    assert [t.seq for t in box.take_unsent()] == [4, 5, 6] and box.pending_job_ids() == {3, 4, 9}
    box.ack(6)
    assert len(box) == 0 and box.acked_through == 6
    box.add(tr())
    box.reset()
    assert box.add(tr()) == 1


def test_outbox_awaits_the_ack_of_what_it_sent_then_not_after_a_reconnect():
    """The writer sends one report at a time (what finishes meanwhile goes in the next):
    awaiting_ack is what holds it back, and a reconnect must not leave it waiting for an
    ack that the broken stream will never bring."""
    box = Outbox()
    box.add(tr())
    assert not box.awaiting_ack()
    box.take_unsent()
    box.add(tr())
    assert box.awaiting_ack() and box.has_unsent()
    box.ack(1)
    assert not box.awaiting_ack()
    box.take_unsent()
    assert box.awaiting_ack()
    box.rewind(1)  # reconnect: the server applied only seq 1; seq 2 is resent
    assert not box.awaiting_ack() and box.has_unsent()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["add", "send", "ack", "reconnect"]), max_size=60), st.randoms())
def test_outbox_delivers_every_seq_once_in_order(ops, rnd):
    """A fake server that applies seqs in order and ignores resends sees 1..n exactly once."""
    box, applied, sent_on_stream = Outbox(), [], []
    for op in ops + ["reconnect", "send", "ack"]:
        if op == "add":
            box.add(tr())
        elif op == "send":
            sent_on_stream += [t.seq for t in box.take_unsent(rnd.randint(1, 4))]
        elif op == "ack":
            for seq in sent_on_stream:
                if seq == (applied[-1] if applied else 0) + 1:
                    applied.append(seq)
            sent_on_stream = []
            box.ack(applied[-1] if applied else 0)
        else:
            sent_on_stream = []  # the broken stream loses what was in flight
            box.rewind(applied[-1] if applied else 0)
    while box.has_unsent() or len(box):
        sent = [t.seq for t in box.take_unsent()]
        for seq in sent:
            if seq == (applied[-1] if applied else 0) + 1:
                applied.append(seq)
        box.ack(applied[-1] if applied else 0)
    assert applied == list(range(1, box.last_seq + 1))


def test_reconnect_backoff_stays_inside_the_lease_timeout():
    client = session.SessionClient.__new__(session.SessionClient)
    client.lease_timeout_s = 0
    assert client._backoff().maximum == session.BACKOFF_MAX_S
    client.lease_timeout_s = 4
    delays = client._backoff()
    assert max(delays.next_delay() for _ in range(20)) <= 1.0


class _Channel:
    """Stubs get made; no call is."""

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


class _Call:
    """The request side of a session stream: what the writer sends."""

    def __init__(self):
        self.reports: list[list[int]] = []
        self.credits: list[tuple[int, int]] = []  # (max_jobs, reserve_jobs) of each credit message
        self.last_seq = 0
        self.sent = asyncio.Event()

    async def write(self, msg):
        if msg.WhichOneof("message") == "report":
            self.reports.append([t.job_id for t in msg.report.transitions])
            self.last_seq = msg.report.transitions[-1].seq
            self.sent.set()
        elif msg.WhichOneof("message") == "credit":
            self.credits.append((msg.credit.max_jobs, msg.credit.reserve_jobs))
            self.sent.set()


def _client(busy: bool) -> session.SessionClient:
    def unused(*_args):
        raise AssertionError("not called")

    callbacks = session.Callbacks(open_message=unused, credit=lambda: session_service_pb2.SessionCredit(),
                                  on_opened=unused, on_leases=unused, on_kill=unused, on_rejection=unused,
                                  on_session_lost=unused, busy=lambda: busy)
    return session.SessionClient(_Channel(), (), callbacks)


async def _reports_after_a_first_one(busy: bool) -> list[list[int]]:
    """Job 1 is reported and acknowledged; then job 2 ends, the loop turns, job 3 ends."""
    client = _client(busy)
    client.report_interval_s = client.fed_report_interval_s = 0.5
    call = _Call()
    writer = asyncio.create_task(client._writer(call))
    try:
        client.report(session_service_pb2.JobTransition(job_id=1))
        await asyncio.wait_for(call.sent.wait(), 5)
        call.sent.clear()
        client.outbox.ack(call.last_seq)
        client.report(session_service_pb2.JobTransition(job_id=2))
        for _ in range(5):
            await asyncio.sleep(0)
        client.report(session_service_pb2.JobTransition(job_id=3))
        while sum(map(len, call.reports)) < 3:
            await asyncio.wait_for(call.sent.wait(), 5)
            call.sent.clear()
            client.outbox.ack(call.last_seq)
            client.wake()
        return call.reports
    finally:
        writer.cancel()


def test_a_busy_launchers_reports_follow_each_other_paced_so_they_share_a_transaction():
    assert asyncio.run(_reports_after_a_first_one(busy=True)) == [[1], [2, 3]]


def test_an_idle_launchers_report_goes_at_once():
    assert asyncio.run(_reports_after_a_first_one(busy=False)) == [[1], [2], [3]]


async def _fed_pause(scenario: Any) -> list[list[int]]:
    """A busy launcher with every slot fed (an empty credit) has reported job 1 and its
    writer waits out the longer pause; `scenario(client, credit)` goes on from there and
    the reports sent by then are returned."""
    credit = session_service_pb2.SessionCredit()
    client = _client(True)
    client.cb.credit = lambda: credit
    client.report_interval_s, client.fed_report_interval_s = 0.0, 60.0
    client._last_report_at = time.monotonic()
    call = _Call()
    writer = asyncio.create_task(client._writer(call))
    try:
        client.report(session_service_pb2.JobTransition(job_id=1))
        for _ in range(20):
            await asyncio.sleep(0)
        assert call.reports == []  # fed: held for the longer pause
        scenario(client, credit)
        await asyncio.wait_for(call.sent.wait(), 5)
        return call.reports
    finally:
        writer.cancel()


def test_a_fed_launchers_longer_pause_ends_when_its_credit_asks_for_jobs():
    """Busy, with every slot fed: the report waits the longer pause; once the credit asks
    for jobs (a slot has nothing left to start) it waits only the short one."""
    def scenario(client: Any, credit: Any) -> None:
        credit.max_jobs = 1
        client.wake()

    assert asyncio.run(_fed_pause(scenario)) == [[1]]


def test_a_fed_pause_is_woken_only_by_what_ends_it():
    """A busy launcher reports and wakes its session for every job; while the writer waits
    out the fed pause, those wake-ups would each cost it a turn of the loop for nothing.
    Only a credit that asks for jobs (or an idle launcher) ends the pause."""
    def scenario(client: Any, credit: Any) -> None:
        assert client._fed_pause
        for job_id in range(2, 6):
            client.report(session_service_pb2.JobTransition(job_id=job_id))
            client.wake()
            assert not client._wake.is_set()
        credit.reserve_jobs = 1
        client.wake()
        assert client._wake.is_set()

    assert asyncio.run(_fed_pause(scenario)) == [[1, 2, 3, 4, 5]]


@pytest.mark.parametrize(("first", "then", "sent"), [
    # Asked for nothing (every slot fed), then to hold jobs ahead (they ran low).
    ({}, [{}, {"reserve_jobs": 128}, {"reserve_jobs": 130}], [(0, 128)]),
    # Asked for a free slot (a launcher with followers nearly always has one about to free),
    # then to hold jobs ahead as well.
    ({"max_jobs": 1}, [{"max_jobs": 2}, {"max_jobs": 1, "reserve_jobs": 128}, {"max_jobs": 2, "reserve_jobs": 127}],
     [(1, 128)]),
], ids=["after-nothing", "after-free-slots"])
def test_a_credit_that_asks_for_more_does_not_wait_for_the_ack_of_the_report_in_flight(
        first: dict[str, int], then: list[dict[str, int]], sent: list[tuple[int, int]]) -> None:
    """A busy launcher's report is in flight and the next waits for its ack. A credit that
    asks for jobs where the one sent last did not, or to hold jobs ahead where it asked
    only for free slots, goes at once, on its own: riding on the next report it would
    reach the server an ack later (report round trips of 40-120 ms on bench_e2e's path
    while the server applies a few hundred transitions), and the slots ran dry meanwhile.
    Only that turn goes early: a credit that keeps asking, with other figures, waits."""
    async def scenario() -> tuple[list[tuple[int, int]], list[list[int]]]:
        credit = [session_service_pb2.SessionCredit(**first)]  # a new message when its figures change, as Master's
        client = _client(True)
        client.cb.credit = lambda: credit[0]
        client.report_interval_s = client.fed_report_interval_s = 0.0
        call = _Call()
        writer = asyncio.create_task(client._writer(call))
        try:
            client.report(session_service_pb2.JobTransition(job_id=1))  # carries the first credit
            await asyncio.wait_for(call.sent.wait(), 5)  # in flight, never acknowledged here
            client.report(session_service_pb2.JobTransition(job_id=2))
            for figures in then:
                credit[0] = session_service_pb2.SessionCredit(**figures)
                client.wake()
                for _ in range(20):
                    await asyncio.sleep(0)
            return call.credits, call.reports
        finally:
            writer.cancel()

    credits, reports = asyncio.run(scenario())
    assert credits == sent
    assert reports == [[1]]


def test_the_credit_is_built_again_only_when_its_figures_change(tmp_path):
    """The session asks for the credit at every wake-up: the same figures give the same
    message (no new protobuf, no serialization), new figures a new one."""
    from tests.launcher.test_hot_path import lease, local_job, master

    m = master(tmp_path, cpus=2, prefetch=8)
    first = m._credit()
    assert m._credit() is first and first.max_jobs == 2
    lease(m, local_job(1, held=False, packing=2))
    second = m._credit()
    assert second is not first and second.max_jobs == 1 and m._credit() is second
    client = session.SessionClient(_Channel(), (), session.Callbacks(
        open_message=None, credit=m._credit, on_opened=None, on_leases=None, on_kill=None,  # type: ignore[arg-type]
        on_rejection=None, on_session_lost=None))  # type: ignore[arg-type]
    msg, raw = client._credit_now()
    assert client._credit_now()[1] is raw and msg is second
    client._leases_received = 3
    msg, raw2 = client._credit_now()
    assert raw2 != raw and msg.leases_received == 3


def test_prefetch_follows_the_run_time_within_its_bounds():
    from balsam_grpc.launcher.master import PREFETCH_MAX, auto_prefetch

    assert auto_prefetch(2) == 0  # run time unknown: a held job could wait while another pilot idles
    assert auto_prefetch(1) == 0
    assert auto_prefetch(2, mean_run_s=60.0) == 0  # long jobs: nothing held for another pilot to wait on
    assert auto_prefetch(2, mean_run_s=0.2) == 2
    assert auto_prefetch(2, mean_run_s=0.005) == 100  # enough for PREFETCH_HORIZON_S of work
    assert auto_prefetch(2, mean_run_s=0.0) == PREFETCH_MAX == 1024
    assert auto_prefetch(128, mean_run_s=60.0) == 0
    assert auto_prefetch(2, mean_run_s=0.0014) == 357  # two slots of no-op jobs: a quarter second
    assert auto_prefetch(512, mean_run_s=0.001) == PREFETCH_MAX


# -- process spec and outcomes -------------------------------------------------------------


def leased(command="echo {{ x }}", kind=app_pb2.APP_KIND_SHELL, preamble="", env=None, **res):
    app = app_pb2.App(id=7, name="a", command_template=command, kind=kind, preamble=preamble, class_path="m.A",
                      parameters=[app_pb2.AppParameter(name="x", default_value="hi there")], environment=env or {})
    job = job_pb2.Job(id=3, app_id=7, workdir="w/3", resources=job_pb2.JobResources(**res))
    return session_service_pb2.LeasedJob(job=job, app=app, lease_generation=2)


def ctx(tmp_path):
    return RunContext(data_dir=tmp_path / "data", apps_dir=tmp_path / "apps", mpiexec="mpiexec",
                      python="/py", job_time_scale=60)


def test_direct_spec_with_env_threads_gpus_and_timeout(tmp_path):
    lj = leased(env={"FOO": "bar", "OMP_NUM_THREADS": "8"}, threads_per_rank=4, gpus_per_rank=1, wall_time_min=2)
    m = NodeManager([NodeSpec("h", 8, 2)], mpi_mode=False)
    placed = m.assign(3, Resources.from_pb(lj.job.resources))
    spec = build_process_spec(lj, placed, ["h"], ctx(tmp_path))
    assert spec.argv == ["echo", "hi there"] and spec.cwd == str(tmp_path / "data" / "w/3")
    assert spec.env["OMP_NUM_THREADS"] == "8" and spec.env["FOO"] == "bar" and spec.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert spec.cpu_ids == [0, 1, 2, 3] and spec.timeout_s == 120


def test_preamble_and_mpi_launch_spec(tmp_path):
    lj = leased(preamble="module load x", num_nodes=2, ranks_per_node=2)
    m = NodeManager([NodeSpec("h1", 4, 0), NodeSpec("h2", 4, 0)], mpi_mode=True)
    placed = m.assign(3, Resources.from_pb(lj.job.resources))
    spec = build_process_spec(lj, placed, ["h1", "h2"], ctx(tmp_path))
    # The preamble is the script; the MPI launch and the command follow as its arguments.
    assert spec.argv[:4] == ["/bin/bash", "-c", 'module load x\nexec "$@"', "balsam-preamble"]
    assert spec.cpu_ids == []
    assert spec.argv[4:11] == ["mpiexec", "-n", "4", "-ppn", "2", "-hosts", "h1,h2"]
    assert spec.argv[-2:] == ["echo", "hi there"]


def test_shell_app_under_mpi_gets_values_as_positional_parameters(tmp_path):
    lj = leased(command="echo {{ x }} > out.txt", num_nodes=2)
    lj.app.shell = True
    m = NodeManager([NodeSpec("h1", 4, 0), NodeSpec("h2", 4, 0)], mpi_mode=True)
    spec = build_process_spec(lj, m.assign(3, Resources.from_pb(lj.job.resources)), ["h1", "h2"], ctx(tmp_path))
    assert spec.argv[0] == "mpiexec"
    assert spec.argv[-5:] == ["/bin/bash", "-c", 'echo "${1}" > out.txt', "a", "hi there"]


def test_python_app_spec_writes_job_file(tmp_path):
    lj = leased(command="", kind=app_pb2.APP_KIND_PYTHON)
    m = NodeManager([NodeSpec("h", 2, 0)], mpi_mode=False)
    spec = build_process_spec(lj, m.assign(3, Resources()), ["h"], ctx(tmp_path))
    assert spec.argv[:3] == ["/py", "-m", "balsam_grpc.launcher.pyfunc"] and ".balsam-job.json" in spec.files
    assert spec.result_path.endswith(".balsam-result.json")


def test_outcomes():
    lj = leased()
    ok = outcomes.outcome_transition(lj, ProcessResult(3, 0, "exit", 1.0))
    assert ok.state == S.JOB_STATE_RUN_DONE and ok.lease_generation == 2 and ok.return_code == 0
    err = outcomes.outcome_transition(lj, ProcessResult(3, 2, "exit", 1.0, tail="boom"))
    assert (err.state, err.return_code, err.error_tail) == (S.JOB_STATE_RUN_ERROR, 2, "boom")
    assert outcomes.outcome_transition(lj, ProcessResult(3, -15, "killed", 1.0)) is None
    assert outcomes.outcome_transition(lj, ProcessResult(3, -15, "timeout", 1.0)).state == S.JOB_STATE_RUN_TIMEOUT
    lj.app.retry_policy.quick_failure_seconds = 5
    quick = outcomes.outcome_transition(lj, ProcessResult(3, 1, "exit", 0.5))
    assert quick.state == S.JOB_STATE_RESTART_READY and "quick failure" in quick.message
    assert outcomes.outcome_transition(lj, ProcessResult(3, 1, "exit", 6.0)).state == S.JOB_STATE_RUN_ERROR
    lj.job.run_count = 4  # retries used up
    assert outcomes.outcome_transition(lj, ProcessResult(3, 1, "exit", 0.5)).state == S.JOB_STATE_RUN_ERROR
    py = leased(command="", kind=app_pb2.APP_KIND_PYTHON)
    done = outcomes.outcome_transition(py, ProcessResult(3, 0, "exit", 1.0, result={"ok": True, "result": [1, 2]}))
    assert done.state == S.JOB_STATE_RUN_DONE and list(done.data["result"]) == [1, 2]
    raised = outcomes.outcome_transition(py, ProcessResult(3, 1, "exit", 1.0, result={"ok": False, "error": "TB"}))
    assert raised.state == S.JOB_STATE_RUN_ERROR and raised.error_tail == "TB"


def test_job_environment_scrubs_the_launchers_mpi():
    env = job_base_environment({"PMI_RANK": "0", "PMI_FD": "5", "HYDRA_X": "1", "PATH": "/bin", "OMPI_COMM_WORLD_SIZE": "2"})
    assert env == {"PATH": "/bin"}


# -- flags ---------------------------------------------------------------------------------


def test_parse_args_and_site_id_from_settings(tmp_path):
    (tmp_path / "settings.yml").write_text("site_id: 42\n")
    cfg = config.parse_args(["--site-dir", str(tmp_path), "--mode", "serial", "--tag", "a=b", "--tag", "c=",
                             "--app-id", "3", "--partition", "gpu", "--wall-time", "0.5"], environ={})
    assert cfg.site_id == 42 and cfg.mode == "serial" and cfg.credit_tags == {"a": "b", "c": "", "partition": "gpu"}
    assert cfg.app_ids == [3] and cfg.wall_time_min == 0.5 and cfg.data_dir == Path(tmp_path) / "data"
    cfg = config.parse_args(["--site-id", "5"], environ={"BALSAM_SITE_DIR": str(tmp_path)})
    assert cfg.site_id == 5 and cfg.site_dir == tmp_path.resolve()
    with pytest.raises(SystemExit):
        config.parse_args(["--tag", "novalue"], environ={"BALSAM_SITE_DIR": str(tmp_path)})


def test_cli_argv_is_built_without_importing_the_launcher():
    from balsam_grpc.cli.launcher import launcher_argv

    argv = launcher_argv("serial", Path("/s"), 0, 0, 30.0, 60.0, ["a=b"], [4], "", 0, "polaris")
    assert argv[1:] == ["-m", "balsam_grpc.launcher", "--mode", "serial", "--site-dir", "/s", "--wall-time", "30.0",
                        "--idle-timeout", "60.0", "--platform", "polaris", "--tag", "a=b", "--app-id", "4"]


def test_the_launcher_lets_its_loop_keep_the_gil_longer(monkeypatch):
    """The spawner threads take the GIL when the loop waits, not by forcing it mid-turn
    (bootstrap.GIL_SWITCH_INTERVAL_S), in the launcher's process only."""
    import sys

    from balsam_grpc.launcher import bootstrap

    async def fake_master(*_args) -> int:
        return round(sys.getswitchinterval() * 1000)

    before = sys.getswitchinterval()
    monkeypatch.setattr(bootstrap, "run_master", fake_master)
    try:
        assert bootstrap.run_rank0(None, [], None, None) == 50  # type: ignore[arg-type]
    finally:
        sys.setswitchinterval(before)
