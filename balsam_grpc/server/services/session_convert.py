"""The one place a sessions row becomes a Session message."""

from __future__ import annotations

from typing import Any

from balsam_grpc.server.convert import EnumCodec, to_timestamp
from balsam_grpc.v1 import common_pb2, session_pb2

STATE = EnumCodec(session_pb2.SessionState, "SESSION_STATE_")
JOB_MODE = EnumCodec(common_pb2.JobMode, "JOB_MODE_")


def session_to_pb(row: dict[str, Any]) -> session_pb2.Session:
    return session_pb2.Session(
        id=row["id"], site_id=row["site_id"], batch_job_id=row["batch_job_id"] or 0,
        job_mode=JOB_MODE.number(row["job_mode"]),
        nodes=[session_pb2.NodeInfo(hostname=n.get("hostname", ""), cpus=int(n.get("cpus", 0)),
                                    gpus=int(n.get("gpus", 0))) for n in row["nodes"] or []],
        state=STATE.number(row["state"]), leased_jobs=int(row.get("leased_jobs") or 0), hostname=row["hostname"],
        create_time=to_timestamp(row["create_time"]), heartbeat_time=to_timestamp(row["heartbeat_time"]),
        expire_time=to_timestamp(row["expire_time"]),
    )
