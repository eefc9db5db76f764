"""What a job's process may inherit from the site or launcher that starts it.

The site daemon and the launcher hold the site's credential (BALSAM_TOKEN) and may have
other secrets in their environment. A job runs user code, so it gets none of them: of
the variables named BALSAM_*, only those below pass (where the server is and how to
reach it, which job and site this is, and the job's own token). Each run of a job gets
its own credential instead, in BALSAM_JOB_TOKEN (server/job_tokens.py says what it may
do); the SDK and balsamctl use it before any other token.
"""

from __future__ import annotations

from collections.abc import Mapping

JOB_TOKEN_ENV = "BALSAM_JOB_TOKEN"
PREFIX = "BALSAM_"
JOB_VISIBLE = frozenset({
    "BALSAM_SERVER", "BALSAM_SITE_ID", "BALSAM_JOB_ID", JOB_TOKEN_ENV, "BALSAM_TLS_CA",
    "BALSAM_KEEPALIVE_TIME_MS", "BALSAM_KEEPALIVE_TIMEOUT_MS", "BALSAM_RECONNECT_MAX_MS",
    "BALSAM_LOG_LEVEL", "BALSAM_LOG_FORMAT",
})


def job_safe(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the BALSAM_ variables a job must not see (BALSAM_TOKEN, the
    profile and home that hold a user's token, a database URL, client keys, secrets...)."""
    return {k: v for k, v in environ.items() if not k.startswith(PREFIX) or k in JOB_VISIBLE}
