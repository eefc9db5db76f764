"""The schema. Alembic migrations under server/migrations are the source of truth on
disk; this module mirrors them for queries (a test checks they agree)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from balsam_grpc.core.states import RUNNABLE_STATES

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# JSONB on PostgreSQL (containment queries and GIN indexes), JSON text on SQLite.
Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite only autoincrements INTEGER PRIMARY KEY; BIGINT elsewhere.
Id = BigInteger().with_variant(Integer(), "sqlite")
# A job's workdir compares byte by byte on PostgreSQL (revision 0016: the unique index's
# comparisons cost a memcmp instead of a collation's strcoll); SQLite's BINARY does already.
Workdir = Text().with_variant(Text(collation="C"), "postgresql")
Time = DateTime(timezone=True)
# The predicate of the runnable-job partial indexes. Queries that should use them test
# `runnable_condition()` (the same states as literals): SQLite only uses a partial index
# when the query's WHERE repeats its predicate, which a bound parameter list does not.
_RUNNABLE_LITERALS = [f"'{state}'" for state in sorted(RUNNABLE_STATES)]
RUNNABLE_PREDICATE = f"state IN ({', '.join(_RUNNABLE_LITERALS)})"


def _id() -> Column:
    return Column("id", Id, primary_key=True, autoincrement=True)


# Tables with an integer id (`_id()`) take this: SQLite then never hands out an id again
# once its row is deleted (AUTOINCREMENT, revision 0005); PostgreSQL's sequences never do.
NEVER_REUSED = {"sqlite_autoincrement": True}


users = Table(
    "users", metadata,
    _id(),
    Column("username", String(150), nullable=False, unique=True),
    Column("password_hash", String(300), nullable=False),
    Column("admin", Boolean, nullable=False, default=False),
    Column("create_time", Time, nullable=False),
    **NEVER_REUSED,
)

tokens = Table(
    "tokens", metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    # sha256 of the secret: a leaked database does not leak usable tokens.
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("scope", String(16), nullable=False),
    Column("site_id", Id, nullable=True),
    Column("description", Text, nullable=False, default=""),
    Column("create_time", Time, nullable=False),
    Column("expire_time", Time, nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

sites = Table(
    "sites", metadata,
    _id(),
    Column("owner_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("hostname", String(255), nullable=False, default=""),
    Column("path", Text, nullable=False, default=""),
    Column("scheduler", String(32), nullable=False, default="local"),
    Column("allowed_queues", Json, nullable=False, default=list),
    Column("allowed_projects", Json, nullable=False, default=list),
    Column("optional_batch_job_params", Json, nullable=False, default=dict),
    Column("transfer_locations", Json, nullable=False, default=list),
    Column("elastic_queue", Json, nullable=False, default=dict),
    Column("scheduler_snapshot", Json, nullable=True),
    Column("connected", Boolean, nullable=False, default=False),
    Column("last_seen_time", Time, nullable=True),
    Column("daemon_version", String(64), nullable=False, default=""),
    Column("daemon_hostname", String(255), nullable=False, default=""),
    # Bumped by every site stream that connects; a stream writes only while it holds the
    # current one (services/site_stream.py), whichever replica serves it.
    Column("stream_generation", BigInteger, nullable=False, default=0, server_default="0"),
    Column("create_time", Time, nullable=False),
    Column("update_time", Time, nullable=False),
    UniqueConstraint("owner_id", "name"),
    **NEVER_REUSED,
)

apps = Table(
    "apps", metadata,
    _id(),
    Column("owner_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("site_id", Id, ForeignKey("sites.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("command_template", Text, nullable=False, default=""),
    Column("shell", Boolean, nullable=False, default=False),
    Column("parameters", Json, nullable=False, default=list),
    Column("transfers", Json, nullable=False, default=list),
    Column("environment", Json, nullable=False, default=dict),
    Column("preamble", Text, nullable=False, default=""),
    Column("cleanup_globs", Json, nullable=False, default=list),
    Column("retry_policy", Json, nullable=False, default=dict),
    Column("hooks", Json, nullable=False, default=dict),
    Column("kind", String(16), nullable=False, default="SHELL"),
    Column("class_path", Text, nullable=False, default=""),
    Column("create_time", Time, nullable=False),
    Column("update_time", Time, nullable=False),
    UniqueConstraint("site_id", "name"),
    Index("ix_apps_owner_id", "owner_id"),
    **NEVER_REUSED,
)

batch_jobs = Table(
    "batch_jobs", metadata,
    _id(),
    Column("owner_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("site_id", Id, ForeignKey("sites.id", ondelete="CASCADE"), nullable=False),
    Column("scheduler_id", String(64), nullable=False, default=""),
    Column("project", String(200), nullable=False, default=""),
    Column("queue", String(200), nullable=False, default=""),
    Column("num_nodes", Integer, nullable=False),
    Column("wall_time_min", Integer, nullable=False),
    Column("job_mode", String(16), nullable=False, default="SERIAL"),
    Column("partitions", Json, nullable=False, default=list),
    Column("filter_tags", Json, nullable=False, default=dict),
    Column("optional_params", Json, nullable=False, default=dict),
    Column("state", String(32), nullable=False),
    Column("status_info", Text, nullable=False, default=""),
    Column("start_time", Time, nullable=True),
    Column("end_time", Time, nullable=True),
    Column("create_time", Time, nullable=False),
    Column("update_time", Time, nullable=False),
    Index("ix_batch_jobs_site_id_state", "site_id", "state"),
    Index("ix_batch_jobs_owner_id", "owner_id"),
    **NEVER_REUSED,
)

jobs = Table(
    "jobs", metadata,
    _id(),
    # No foreign keys (revision 0011; SQLite keeps them): owner and site are the app's,
    # and statement triggers check app_id per INSERT and delete a deleted app's jobs.
    Column("owner_id", Id, nullable=False),
    Column("site_id", Id, nullable=False),
    Column("app_id", Id, nullable=False),
    Column("name", String(255), nullable=False, default=""),
    Column("workdir", Workdir, nullable=False),
    Column("tags", Json, nullable=False, default=dict),
    Column("parameters", Json, nullable=False, default=dict),
    Column("data", Json, nullable=False, default=dict),
    Column("transfers", Json, nullable=False, default=dict),
    Column("num_nodes", Integer, nullable=False, default=1),
    Column("ranks_per_node", Integer, nullable=False, default=1),
    Column("threads_per_rank", Integer, nullable=False, default=1),
    Column("threads_per_core", Integer, nullable=False, default=1),
    Column("gpus_per_rank", Integer, nullable=False, default=0),
    Column("node_packing_count", Integer, nullable=False, default=1),
    Column("wall_time_min", Integer, nullable=False, default=0),
    Column("launch_params", Json, nullable=False, default=dict),
    Column("priority", Integer, nullable=False, default=0),
    Column("state", String(32), nullable=False),
    Column("state_message", Text, nullable=False, default=""),
    Column("return_code", Integer, nullable=True),
    Column("error_tail", Text, nullable=False, default=""),
    # No foreign key either (revision 0013; SQLite keeps it): row triggers check a job that
    # names a batch job, and a deleted batch job is cleared from its jobs by trigger.
    Column("batch_job_id", Id, nullable=True),
    Column("session_id", String(32), nullable=True),
    Column("lease_generation", BigInteger, nullable=False, default=0),
    Column("lease_expire_time", Time, nullable=True),
    Column("on_parent_failure", String(16), nullable=False, default="FAIL"),
    Column("run_count", Integer, nullable=False, default=0),
    # Parents not yet finished; the job is released when it drops to zero.
    Column("pending_parents", Integer, nullable=False, default=0),
    Column("parent_ids", Json, nullable=False, default=list),
    Column("create_time", Time, nullable=False),
    Column("update_time", Time, nullable=False),
    Column("state_time", Time, nullable=False),
    # Set when the site daemon has deleted the app's cleanup globs in the finished workdir
    # (revision 0003); cleanup_info says what it removed or why it could not.
    Column("cleaned_time", Time, nullable=True),
    Column("cleanup_info", Text, nullable=True),
    UniqueConstraint("site_id", "workdir"),
    # id before site_id (revision 0019): a list of one state in id order walks the state's
    # rows in order and stops at its page (store.jobs._list_sql), instead of walking the
    # primary key past every older job in another state. A query of one site's jobs in a
    # state tests site_id inside the index (no row read for another site's job).
    Index("ix_jobs_owner_id_state_id_site_id", "owner_id", "state", "id", "site_id"),
    Index("ix_jobs_app_id", "app_id"),
    # Partial: every query asks for one value, and a new job has neither (revision 0010).
    Index("ix_jobs_session_id", "session_id", postgresql_where=text("session_id IS NOT NULL"),
          sqlite_where=text("session_id IS NOT NULL")),
    Index("ix_jobs_batch_job_id", "batch_job_id", postgresql_where=text("batch_job_id IS NOT NULL"),
          sqlite_where=text("batch_job_id IS NOT NULL")),
    # PostgreSQL only (revision 0018): SQLite filters tags with json_extract, which no
    # index on the whole JSON text serves, so there it was a cost on every insert.
    Index("ix_jobs_tags_gin", "tags", postgresql_using="gin", postgresql_ops={"tags": "jsonb_path_ops"}
          ).ddl_if(dialect="postgresql"),
    # Lease order of the session stream's acquisition (migration 0002): it stops early.
    # Also serves every query on runnable jobs of a site (0010 dropped ix_jobs_runnable,
    # a prefix of it with the same predicate).
    Index(
        "ix_jobs_lease_order", "site_id", text("priority DESC"), text("num_nodes DESC"), text("wall_time_min DESC"), "id",
        postgresql_where=text(RUNNABLE_PREDICATE),
        sqlite_where=text(RUNNABLE_PREDICATE),
    ),
    # The site stream finds finished workdirs still to clean, per site and app.
    Index(
        "ix_jobs_cleanup_due", "site_id", "app_id", "id",
        postgresql_where=text("state = 'JOB_FINISHED' AND cleaned_time IS NULL"),
        sqlite_where=text("state = 'JOB_FINISHED' AND cleaned_time IS NULL"),
    ),
    **NEVER_REUSED,
)

# Jobs per (owner, site, state), written by triggers on jobs in the transaction of every
# insert, state change and delete (revision 0010, store/job_counts.py). The count of a
# group is the sum over its shards: on PostgreSQL each writing transaction adds its own
# row (shard = its transaction id) and compaction folds them into shard 0; SQLite's
# single writer updates shard 0 in place. No foreign keys: a cascade's deletes write the
# deltas that cancel a deleted site's rows.
job_counts = Table(
    "job_counts", metadata,
    Column("owner_id", Id, primary_key=True),
    Column("site_id", Id, primary_key=True),
    Column("state", String(32), primary_key=True),
    Column("shard", BigInteger, primary_key=True),
    Column("n", BigInteger, nullable=False),
)

job_parents = Table(
    "job_parents", metadata,
    Column("child_id", Id, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("parent_id", Id, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Index("ix_job_parents_parent_id", "parent_id"),
)

transfer_items = Table(
    "transfer_items", metadata,
    _id(),
    Column("owner_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("site_id", Id, ForeignKey("sites.id", ondelete="CASCADE"), nullable=False),
    Column("job_id", Id, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("direction", String(8), nullable=False),
    Column("slot", String(200), nullable=False),
    Column("location_alias", String(200), nullable=False),
    Column("remote_path", Text, nullable=False),
    Column("local_path", Text, nullable=False),
    Column("recursive", Boolean, nullable=False, default=False),
    Column("state", String(16), nullable=False),
    Column("task_id", String(128), nullable=False, default=""),
    Column("error", Text, nullable=False, default=""),
    Column("bytes", BigInteger, nullable=False, default=0),
    Column("files", BigInteger, nullable=False, default=0),
    Column("duration_seconds", Float, nullable=False, default=0.0),
    Column("create_time", Time, nullable=False),
    Column("update_time", Time, nullable=False),
    Index("ix_transfer_items_site_id_state", "site_id", "state"),
    **NEVER_REUSED,
)

sessions = Table(
    "sessions", metadata,
    Column("id", String(32), primary_key=True),
    Column("owner_id", Id, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("site_id", Id, ForeignKey("sites.id", ondelete="CASCADE"), nullable=False),
    Column("batch_job_id", Id, ForeignKey("batch_jobs.id", ondelete="SET NULL"), nullable=True),
    Column("job_mode", String(16), nullable=False, default="SERIAL"),
    Column("nodes", Json, nullable=False, default=list),
    Column("state", String(16), nullable=False),
    Column("hostname", String(255), nullable=False, default=""),
    Column("applied_through_seq", BigInteger, nullable=False, default=0),
    Column("create_time", Time, nullable=False),
    Column("heartbeat_time", Time, nullable=False),
    Column("expire_time", Time, nullable=False),
    Index("ix_sessions_site_id_state", "site_id", "state"),
)

# Append-only provenance log. No foreign keys: events outlive deleted jobs.
events = Table(
    "events", metadata,
    _id(),
    Column("owner_id", Id, nullable=False),
    Column("site_id", Id, nullable=False, default=0),
    Column("job_id", Id, nullable=True),
    Column("kind", String(16), nullable=False),  # job_state | transfer_state | batch_job_state
    Column("subject_id", Id, nullable=True),  # transfer item / batch job id
    Column("from_state", String(32), nullable=False, default=""),
    Column("to_state", String(32), nullable=False),
    Column("time", Time, nullable=False),  # when it happened (the reporter's time, bounded)
    Column("receive_time", Time, nullable=True),  # when the server recorded it (NULL: the same as time)
    Column("data", Json, nullable=True),
    Column("message", Text, nullable=False, default=""),
    Index("ix_events_owner_id_id", "owner_id", "id"),
    Index("ix_events_job_id", "job_id"),
    **NEVER_REUSED,
)

# Answers to mutations carrying a request_id, so a retry gets the first answer.
idempotency_keys = Table(
    "idempotency_keys", metadata,
    Column("owner_id", Id, primary_key=True),
    Column("method", String(100), primary_key=True),
    Column("request_id", String(128), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("response", LargeBinary, nullable=False),
    Column("create_time", Time, nullable=False),
)

# Wrong passwords per (user name, client address), and per address for any name
# (username ""): the login limiter's state, shared by every server process on the database.
login_failures = Table(
    "login_failures", metadata,
    Column("username", String(200), primary_key=True),
    Column("address", String(64), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure", Time, nullable=False),
    Column("blocked_until", Time, nullable=True),
    Index("ix_login_failures_last_failure", "last_failure"),
)


# Keys the server signs with (server/job_tokens.py). In the database, not a file, so
# every server process sharing it accepts what another one issued.
server_keys = Table(
    "server_keys", metadata,
    Column("name", String(64), primary_key=True),
    Column("secret", String(128), nullable=False),
    Column("create_time", Time, nullable=False),
)


def runnable_condition() -> Any:
    """`jobs.state IN ('PREPROCESSED', 'RESTART_READY')` with literal states: the
    predicate of ix_jobs_lease_order."""
    return jobs.c.state.in_([literal_column(lit) for lit in _RUNNABLE_LITERALS])
