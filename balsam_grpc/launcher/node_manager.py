"""First-fit packing of jobs onto the allocation's nodes (pure, no I/O).

A single-node job takes `ranks_per_node * ceil(threads_per_rank / threads_per_core)` CPUs,
`ranks_per_node * gpus_per_rank` GPUs and 1/node_packing_count of the node's occupancy on
the first node where all three fit. A multi-node job takes whole idle nodes. A job that
could never fit, even on an empty allocation, gets a reason from `never_fits` so the
launcher reports it (RUN_ERROR with that message) instead of holding it forever.
Occupancy is kept exact, in whole units of 1/L of a node (L the least common multiple of
the packings seen so far): three jobs of packing 3 fill a node exactly, and the per-job
bookkeeping is integer arithmetic (Fractions cost microseconds per operation, several per
job placed and released).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from fractions import Fraction

from balsam_grpc.launcher.nodes import NodeSpec


@functools.lru_cache(maxsize=256)
def _occupancy(packing: int) -> Fraction:
    return Fraction(1, packing)  # the same object every time: a Fraction costs microseconds to make


@dataclass(frozen=True, slots=True)
class Resources:
    """A job's resource request with the server defaults applied to zero values."""

    num_nodes: int = 1
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    threads_per_core: int = 1
    gpus_per_rank: int = 0
    node_packing_count: int = 1

    @classmethod
    def from_pb(cls, res) -> Resources:  # balsam_grpc.v1.job_pb2.JobResources
        return cls(num_nodes=max(1, res.num_nodes), ranks_per_node=max(1, res.ranks_per_node),
                   threads_per_rank=max(1, res.threads_per_rank), threads_per_core=max(1, res.threads_per_core),
                   gpus_per_rank=max(0, res.gpus_per_rank), node_packing_count=max(1, res.node_packing_count))

    @property
    def cpus_per_node(self) -> int:
        return self.ranks_per_node * math.ceil(self.threads_per_rank / self.threads_per_core)

    @property
    def gpus_per_node(self) -> int:
        return self.ranks_per_node * self.gpus_per_rank

    @property
    def occupancy(self) -> Fraction:
        # Packing applies to single-node jobs only; a multi-node job owns its nodes.
        return _occupancy(self.node_packing_count if self.num_nodes == 1 else 1)

    @property
    def needs_mpi_launch(self) -> bool:
        return self.num_nodes > 1 or self.ranks_per_node > 1


@dataclass(slots=True)
class Assignment:
    """Where a job runs: node indices with the CPU and GPU ids it owns on each."""

    job_id: int
    nodes: list[int]
    cpu_ids: list[list[int]]
    gpu_ids: list[list[int]]
    occupancy: Fraction


@dataclass(slots=True)
class _Node:
    spec: NodeSpec
    free_cpus: list[int]
    free_gpus: list[int]
    used: int = 0  # occupancy in units of 1/unit of a node
    unit: int = 1  # the manager's unit (all nodes share it)
    jobs: set[int] = field(default_factory=set)

    @property
    def idle(self) -> bool:
        return not self.jobs

    @property
    def occupancy(self) -> Fraction:
        return Fraction(self.used, self.unit)


@dataclass(frozen=True, slots=True)
class Capacity:
    """Free capacity in the terms of a SessionCredit."""

    max_jobs: int
    free_nodes: float
    max_nodes_per_job: int


class NodeManager:
    def __init__(self, nodes: list[NodeSpec], *, mpi_mode: bool) -> None:
        if not nodes:
            raise ValueError("a launcher needs at least one node")
        self.mpi_mode = mpi_mode
        self.nodes = [_Node(n, list(range(n.cpus)), list(range(n.gpus))) for n in nodes]
        self.assignments: dict[int, Assignment] = {}
        # A job placed to follow a running one (follow): what it takes over when that one
        # is released, by the job it follows, and the job each follower waits on.
        self.followers: dict[int, Assignment] = {}
        self._following: dict[int, int] = {}
        self._capacity: Capacity | None = None  # until the next assign or release
        self.unit = 1  # a node's occupancy is counted in 1/unit: a multiple of every packing seen

    def _units(self, occupancy: Fraction) -> int:
        """`occupancy` (1/packing) in units, the unit refined first if it cannot count it."""
        if self.unit % occupancy.denominator:
            unit = math.lcm(self.unit, occupancy.denominator)
            for node in self.nodes:
                node.used, node.unit = node.used * (unit // self.unit), unit
            self.unit = unit
        return self.unit // occupancy.denominator * occupancy.numerator

    def __len__(self) -> int:
        return len(self.nodes)

    def never_fits(self, res: Resources) -> str | None:
        """Why this job can never run in this allocation, or None if it can."""
        if res.needs_mpi_launch and not self.mpi_mode:
            return (f"needs {res.num_nodes} node(s) x {res.ranks_per_node} rank(s) per node, i.e. an MPI launch, "
                    "but this launcher runs in serial mode (start it with --mode mpi)")
        if res.num_nodes > len(self.nodes):
            return f"needs {res.num_nodes} nodes but this allocation has {len(self.nodes)}"
        most_cpus = max(n.spec.cpus for n in self.nodes)
        if res.cpus_per_node > most_cpus:
            return (f"needs {res.cpus_per_node} CPUs per node ({res.ranks_per_node} ranks x "
                    f"{res.threads_per_rank} threads / {res.threads_per_core} per core) but nodes have at most "
                    f"{most_cpus}")
        most_gpus = max(n.spec.gpus for n in self.nodes)
        if res.gpus_per_node > most_gpus:
            return f"needs {res.gpus_per_node} GPUs per node but nodes have at most {most_gpus}"
        fitting = [n for n in self.nodes if n.spec.cpus >= res.cpus_per_node and n.spec.gpus >= res.gpus_per_node]
        if len(fitting) < res.num_nodes:
            return (f"needs {res.num_nodes} nodes with {res.cpus_per_node} CPUs and {res.gpus_per_node} GPUs; "
                    f"only {len(fitting)} such nodes in this allocation")
        return None

    def assign(self, job_id: int, res: Resources) -> Assignment | None:
        """Place the job now (first fit) or return None when it must wait."""
        if job_id in self.assignments:
            raise ValueError(f"job {job_id} is already placed")
        occupancy = res.occupancy
        units, limit = self._units(occupancy), self.unit
        ncpus, ngpus = res.cpus_per_node, res.gpus_per_node
        if res.num_nodes == 1:
            picks = []
            for i, n in enumerate(self.nodes):
                if n.used + units <= limit and len(n.free_cpus) >= ncpus and len(n.free_gpus) >= ngpus:
                    picks.append(i)
                    break
        else:
            picks = [i for i, n in enumerate(self.nodes) if n.idle and n.used + units <= limit
                     and len(n.free_cpus) >= ncpus and len(n.free_gpus) >= ngpus][: res.num_nodes]
        if len(picks) < res.num_nodes:
            return None
        cpu_ids, gpu_ids = [], []
        for i in picks:
            node = self.nodes[i]
            cpus, node.free_cpus = node.free_cpus[:ncpus], node.free_cpus[ncpus:]
            gpus, node.free_gpus = node.free_gpus[:ngpus], node.free_gpus[ngpus:]
            node.used += units
            node.jobs.add(job_id)
            cpu_ids.append(cpus)
            gpu_ids.append(gpus)
        placed = Assignment(job_id, picks, cpu_ids, gpu_ids, occupancy)
        self.assignments[job_id] = placed
        self._capacity = None
        return placed

    def follow(self, job_id: int, after: int) -> Assignment | None:
        """Place the job on what the running job `after` holds, to start when that one ends:
        released, `after` hands its nodes, CPUs, GPUs and share to it instead of freeing
        them. None when `after` holds nothing or has a follower already. The caller makes
        sure the job needs what `after` has (the same resources)."""
        placed = self.assignments.get(after)
        if placed is None or after in self.followers or job_id in self.assignments or job_id in self._following:
            return None
        follower = Assignment(job_id, placed.nodes, placed.cpu_ids, placed.gpu_ids, placed.occupancy)
        self.followers[after] = follower
        self._following[job_id] = after
        return follower

    def release(self, job_id: int) -> None:
        after = self._following.pop(job_id, None)
        if after is not None:  # a follower ended (or never started) before the job it followed
            del self.followers[after]
            return
        placed = self.assignments.pop(job_id, None)
        if placed is None:
            return
        follower = self.followers.pop(job_id, None)
        if follower is not None:  # what it held passes on as it is: capacity does not change
            del self._following[follower.job_id]
            self.assignments[follower.job_id] = follower
            for i in placed.nodes:
                jobs = self.nodes[i].jobs
                jobs.discard(job_id)
                jobs.add(follower.job_id)
            return
        self._capacity = None
        units = self._units(placed.occupancy)
        for i, cpus, gpus in zip(placed.nodes, placed.cpu_ids, placed.gpu_ids, strict=True):
            node = self.nodes[i]
            node.free_cpus = sorted(node.free_cpus + cpus)
            if gpus:
                node.free_gpus = sorted(node.free_gpus + gpus)
            node.used -= units
            node.jobs.discard(job_id)

    def full(self) -> bool:
        """No job can be placed now: every node is out of CPUs or fully occupied."""
        return not self.capacity().max_jobs  # the free CPUs of the nodes not fully occupied

    def capacity(self) -> Capacity:
        """What could start now. Aggregate by nature: two half-free nodes offer 1.0 node of
        footprint, so a packing-1 job leased against it waits for an idle node."""
        if self._capacity is not None:
            return self._capacity
        unit = self.unit
        usable = [n for n in self.nodes if n.free_cpus and n.used < unit]
        free_nodes = sum(unit - n.used for n in usable) / unit  # int / int: exact, rounded once
        max_jobs = sum(len(n.free_cpus) for n in usable)
        idle = sum(1 for n in self.nodes if n.idle)
        max_nodes = idle if self.mpi_mode else min(idle, 1)
        if max_nodes == 0 and usable:
            max_nodes = 1
        self._capacity = Capacity(max_jobs=max_jobs, free_nodes=free_nodes, max_nodes_per_job=max_nodes)
        return self._capacity

    def busy_nodes(self) -> int:
        return sum(1 for n in self.nodes if not n.idle)

    def free_node_fraction(self) -> float:
        return sum(self.unit - n.used for n in self.nodes) / self.unit
