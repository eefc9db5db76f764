"""Hooks run in child processes, at most `workers` at once.

Each hook gets a fresh `python -m balsam_grpc.site.hook_process REQUEST RESULT APPS WORKDIR`
whose stdout and stderr go to `<workdir>/balsam-hooks.log`. A fresh process per hook
keeps user code out of the daemon (an exception, a segfault, `os._exit` or a hang can
only fail that job), re-reads the apps folder so edited apps take effect, and lets the
daemon kill a hook that overruns its timeout. The cost is an interpreter start per hook
(a few hundred ms), small next to a batch job. Hooks run user code: they get none of the
daemon's credentials (core/jobenv.py).

The daemon passes each hook its request and takes its result through a folder of its own
under the site's scratch folder (`state/hooks`), removed when the hook ends. A daemon
killed mid-hook (the hook dies with it) cannot remove it: the next daemon's pool empties
the scratch folder when it starts (it holds the site lock, so no other daemon uses it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

import structlog

from balsam_grpc.core.confined import make_dirs_inside, open_private
from balsam_grpc.core.jobenv import job_safe
from balsam_grpc.site.hooks import HOOK_METHODS, failed_result
from balsam_grpc.v1 import site_service_pb2

log = structlog.get_logger(__name__)

HOOK_LOG = "balsam-hooks.log"
SCRATCH_PREFIX = "balsam-hook-"


class HookPool:
    def __init__(self, apps_dir: Path, workers: int, timeout_s: float, scratch_dir: Path) -> None:
        """scratch_dir: this pool's own (one daemon per site); what a killed predecessor left
        there is removed now."""
        self.apps_dir = apps_dir
        self.timeout_s = timeout_s
        self.scratch_dir = scratch_dir
        self._slots = asyncio.Semaphore(workers)
        if scratch_dir.is_dir():
            for left in scratch_dir.glob(f"{SCRATCH_PREFIX}*"):
                log.info("removing the folder of a hook a killed daemon left", folder=str(left))
                shutil.rmtree(left, ignore_errors=True)
        scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def run(self, run: site_service_pb2.RunHook, workdir: Path) -> site_service_pb2.HookResult:
        """Run one hook; never raises: every failure becomes a FAILED HookResult."""
        method = HOOK_METHODS.get(run.hook, f"hook {run.hook}")
        async with self._slots:
            try:
                return await self._run_child(run, workdir)
            except Exception as exc:  # the daemon must survive anything a hook does
                log.exception("hook failed to run", job_id=run.job.id, hook=method)
                return failed_result(run.job.id, run.hook, f"{method} hook could not run: {exc}")

    async def _run_child(self, run: site_service_pb2.RunHook, workdir: Path) -> site_service_pb2.HookResult:
        method = HOOK_METHODS.get(run.hook, f"hook {run.hook}")
        # The daemon resolved and confined the workdir (cleaner.job_workdir); it is created
        # owner-only, and a symlink that appears meanwhile is refused.
        make_dirs_inside(workdir, "/", what="workdir")
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=self.scratch_dir) as tmp:
            request = Path(tmp) / "request.pb"
            result = Path(tmp) / "result.pb"
            request.write_bytes(run.SerializeToString())
            with os.fdopen(open_private(workdir / HOOK_LOG, append=True), "ab") as out:
                out.write(f"--- {method} job {run.job.id} run {run.job.run_count} ---\n".encode())
                out.flush()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "balsam_grpc.site.hook_process", str(request), str(result),
                    str(self.apps_dir), str(workdir), str(os.getpid()), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=out, cwd=str(workdir), start_new_session=True, env=job_safe(os.environ))
                try:
                    async with asyncio.timeout(self.timeout_s):
                        code = await proc.wait()
                except TimeoutError:
                    _kill_group(proc.pid)
                    await proc.wait()
                    return failed_result(run.job.id, run.hook,
                                         f"{method} hook ran longer than {self.timeout_s:g} s and was killed")
                except asyncio.CancelledError:
                    _kill_group(proc.pid)
                    raise
            if code != 0 or not result.exists():
                return failed_result(run.job.id, run.hook,
                                     f"{method} hook process exited with code {code} without a result; "
                                     f"see {workdir / HOOK_LOG}")
            return site_service_pb2.HookResult.FromString(result.read_bytes())


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass


def die_with_parent(parent_pid: int) -> None:
    """A hook must not outlive a killed daemon: the restarted daemon runs it again, and two
    copies of user code in one workdir would fight. Linux only (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the daemon died before prctl took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    from balsam_grpc.site.hooks import run_hook_in_this_process

    if len(argv) == 5:
        die_with_parent(int(argv.pop()))
    request, result, apps_dir, workdir = (Path(a) for a in argv)
    run = site_service_pb2.RunHook.FromString(request.read_bytes())
    outcome = run_hook_in_this_process(run, apps_dir, workdir)
    sys.stdout.flush()
    tmp = result.with_suffix(".tmp")
    tmp.write_bytes(outcome.SerializeToString())
    os.replace(tmp, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
