"""Which transition a finished run reports (pure)."""

from __future__ import annotations

import time

from google.protobuf import struct_pb2

from balsam_grpc.core import pyvalues
from balsam_grpc.launcher.runner import ProcessResult
from balsam_grpc.v1 import app_pb2, job_pb2, session_service_pb2

DEFAULT_MAX_RETRIES = 3
# What a Python-function app's outcome puts in the job's data (core.pyvalues).
_RESULT_KEYS = (pyvalues.RESULT_KEY, pyvalues.RESULT_JSON_KEY)


def transition(leased: session_service_pb2.LeasedJob, state: int, *, message: str = "",
               return_code: int | None = None, tail: str = "", data: dict | None = None,
               when: float | None = None) -> session_service_pb2.JobTransition:
    tr = session_service_pb2.JobTransition(job_id=leased.job.id, lease_generation=leased.lease_generation,
                                           state=state, message=message, error_tail=tail)
    if return_code is not None:
        tr.return_code = return_code
    # Set directly: Timestamp.GetCurrentTime goes through a datetime (~6 us against 0.3),
    # and every job reports twice.
    tr.time.seconds, tr.time.nanos = divmod(time.time_ns() if when is None else int(when * 1e9), 1_000_000_000)
    if data:
        s = struct_pb2.Struct()
        s.update(data)
        tr.data.CopyFrom(s)
    return tr


def quick_failure_retry(leased: session_service_pb2.LeasedJob, elapsed_s: float) -> bool:
    """A run that failed faster than the app's quick_failure_seconds is retried (RESTART_READY)
    while the job has retries left; the server counts runs in run_count."""
    policy = leased.app.retry_policy
    if policy.quick_failure_seconds <= 0 or elapsed_s >= policy.quick_failure_seconds:
        return False
    max_retries = policy.max_retries or DEFAULT_MAX_RETRIES
    return leased.job.run_count <= max_retries


def outcome_transition(leased: session_service_pb2.LeasedJob,
                       res: ProcessResult) -> session_service_pb2.JobTransition | None:
    """The transition for a finished process, or None when nothing is to be reported (the
    job was killed because the server asked or the lease is gone)."""
    S = job_pb2
    if res.outcome == "killed":
        return None
    if res.outcome == "timeout":
        return transition(leased, S.JOB_STATE_RUN_TIMEOUT, message=res.message or "timed out",
                          return_code=res.return_code, tail=res.tail)
    if res.outcome == "spawn_error":
        return transition(leased, S.JOB_STATE_RUN_ERROR, message=res.message, tail=res.tail)
    is_python = leased.app.kind == app_pb2.APP_KIND_PYTHON
    if res.return_code == 0:
        if not is_python:
            return transition(leased, S.JOB_STATE_RUN_DONE, return_code=0)
        if res.result and res.result.get("ok"):
            return transition(leased, S.JOB_STATE_RUN_DONE, return_code=0,
                              data={k: v for k, v in res.result.items() if k in _RESULT_KEYS})
        return transition(leased, S.JOB_STATE_RUN_ERROR, return_code=0, tail=res.tail,
                          message="the Python app exited without writing its result")
    tail = res.tail
    data = None
    if is_python and res.result and not res.result.get("ok"):
        tail = str(res.result.get("error", ""))[-8192:]
        if pyvalues.EXCEPTION_KEY in res.result:  # job.result() re-raises it in the caller
            data = {pyvalues.EXCEPTION_KEY: res.result[pyvalues.EXCEPTION_KEY]}
    rc = res.return_code
    what = f"exited with return code {rc}" if rc is not None and rc >= 0 else f"was killed by signal {-(rc or 0)}"
    if quick_failure_retry(leased, res.elapsed_s):
        return transition(leased, S.JOB_STATE_RESTART_READY, return_code=rc, tail=tail,
                          message=f"quick failure: {what} after {res.elapsed_s:.2f} s "
                                  f"(< {leased.app.retry_policy.quick_failure_seconds} s); retrying")
    return transition(leased, S.JOB_STATE_RUN_ERROR, return_code=rc, tail=tail, message=f"the run {what}",
                      data=data)
