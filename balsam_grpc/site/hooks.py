"""Running one app hook (preprocess, postprocess, handle_error, handle_timeout) for a job.

`natural_next_state` and `build_hook_result` are pure. `run_hook_in_this_process` loads
the site's apps, runs the hook in the job's workdir and returns a HookResult; it is what
the child process of `balsam_grpc.site.hook_process` executes, so user code never runs
inside the daemon (an exception, a crash or a hang cannot take the daemon down).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

from google.protobuf import field_mask_pb2, struct_pb2

from balsam_grpc.core.validation import FIELD_LIMITS, clip_utf8
from balsam_grpc.v1 import app_pb2, job_pb2, site_service_pb2

HOOK_METHODS = {
    site_service_pb2.HOOK_KIND_PREPROCESS: "preprocess",
    site_service_pb2.HOOK_KIND_POSTPROCESS: "postprocess",
    site_service_pb2.HOOK_KIND_HANDLE_ERROR: "handle_error",
    site_service_pb2.HOOK_KIND_HANDLE_TIMEOUT: "handle_timeout",
}
DEFAULT_MAX_RETRIES = 3


def natural_next_state(hook: int, app: app_pb2.App, run_count: int) -> int:
    """The state a job moves to when its hook ran without choosing one."""
    if hook == site_service_pb2.HOOK_KIND_PREPROCESS:
        return job_pb2.JOB_STATE_PREPROCESSED
    if hook == site_service_pb2.HOOK_KIND_POSTPROCESS:
        return job_pb2.JOB_STATE_POSTPROCESSED
    policy = app.retry_policy
    max_retries = policy.max_retries or DEFAULT_MAX_RETRIES
    retries_left = run_count <= max_retries
    if hook == site_service_pb2.HOOK_KIND_HANDLE_ERROR:
        restart = policy.on_error == app_pb2.RETRY_ACTION_RESTART
    else:  # timeouts restart unless the app says fail
        restart = policy.on_timeout != app_pb2.RETRY_ACTION_FAIL
    return job_pb2.JOB_STATE_RESTART_READY if restart and retries_left else job_pb2.JOB_STATE_FAILED


def failed_result(job_id: int, hook: int, message: str) -> site_service_pb2.HookResult:
    # The traceback's end says what went wrong: keep it, within the server's limit.
    tail = clip_utf8(message, FIELD_LIMITS["balsam.v1.HookResult.state_message"], keep_end=True)
    return site_service_pb2.HookResult(job_id=job_id, hook=hook, next_state=job_pb2.JOB_STATE_FAILED,
                                       state_message=tail)


def build_hook_result(run: site_service_pb2.RunHook, next_state: str | None, changed: dict[str, Any],
                      new_jobs: list[job_pb2.Job] | None = None) -> site_service_pb2.HookResult:
    """A HookResult from what the hook did to its JobHandle."""
    if next_state:
        state = job_pb2.JobState.Value("JOB_STATE_" + next_state)
    else:
        state = natural_next_state(run.hook, run.app, run.job.run_count)
    result = site_service_pb2.HookResult(job_id=run.job.id, hook=run.hook, next_state=state,
                                         state_message=f"{HOOK_METHODS[run.hook]} hook done")
    paths = []
    for name in ("parameters", "tags"):
        if name in changed:
            getattr(result.job_changes, name).update({str(k): str(v) for k, v in changed[name].items()})
            paths.append(name)
    if "data" in changed:
        data = struct_pb2.Struct()
        data.update(changed["data"])
        result.job_changes.data.CopyFrom(data)
        paths.append("data")
    if paths:
        result.job_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    result.new_jobs.extend(new_jobs or [])
    return result


def run_hook_in_this_process(run: site_service_pb2.RunHook, apps_dir: Path, workdir: Path
                             ) -> site_service_pb2.HookResult:
    """Load the app class, run the hook in `workdir`; an exception fails the job with its
    traceback. Meant for a child process: it changes the working directory."""
    from balsam_grpc.core.appdef import JobHandle, load_app_classes

    method = HOOK_METHODS.get(run.hook)
    if method is None:
        return failed_result(run.job.id, run.hook, f"unknown hook kind {run.hook}")
    try:
        classes = load_app_classes(apps_dir)
        cls = classes.get(run.app.class_path)
        if cls is None:
            by_name = {c.app_name(): c for c in classes.values()}
            cls = by_name.get(run.app.name)
        if cls is None:
            known = ", ".join(sorted(classes)) or "none"
            return failed_result(run.job.id, run.hook,
                                 f"{method} hook: app class {run.app.class_path or run.app.name!r} not found in "
                                 f"{apps_dir} (found: {known})")
        workdir.mkdir(parents=True, exist_ok=True)
        os.chdir(workdir)
        handle = JobHandle(run.job, workdir)
        instance = cls(handle)
        # Dynamic workflows: a hook appends Job messages to self.new_jobs; the server
        # creates them in the same transaction as the hook's result.
        instance.new_jobs = []
        getattr(instance, method)()
        next_state, changed = handle.changes()
        new_jobs = list(getattr(instance, "new_jobs", None) or [])
        return build_hook_result(run, next_state, changed, [j for j in new_jobs if isinstance(j, job_pb2.Job)])
    except Exception:  # user code: any exception fails the job with the traceback
        tb = traceback.format_exc()
        print(tb, flush=True)  # also into balsam-hooks.log
        return failed_result(run.job.id, run.hook, f"{method} hook raised:\n{tb}")
