"""Scheduler adapters on captured outputs (tests/site/golden/<scheduler>/), the adapters'
flows against fake scheduler commands that print those captures, templates, platform
presets, and fuzzing: parsers never raise on arbitrary text."""

from __future__ import annotations

import asyncio
import json
import shlex
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balsam_grpc.site.platforms import (
    PlatformError,
    list_platforms,
    load_platform,
    validate_platform,
)
from balsam_grpc.site.schedulers import (
    SCHEDULER_NAMES,
    BackfillWindow,
    SchedulerUnavailable,
    SubmitError,
    TemplateError,
    cobalt,
    get_scheduler,
    lsf,
    pbs,
    read_template,
    render_template,
    slurm,
)
from balsam_grpc.site.schedulers.base import (
    local_to_utc,
    parse_duration_min,
    parse_hms_min,
)

GOLDEN = Path(__file__).parent / "golden"


def golden(scheduler: str, name: str) -> str:
    return (GOLDEN / scheduler / name).read_text()


def local(*args: int) -> datetime:
    return local_to_utc(datetime(*args))


def run(coro):
    return asyncio.run(coro)


def fake_command(bin_dir: Path, name: str, *, stdout: str = "", stderr: str = "", rc: int = 0) -> Path:
    """A stand-in for a scheduler command: prints the given captures, exits rc, and appends
    its argv (one JSON list per line) to <bin_dir>/<name>.calls."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / f"{name}.stdout").write_text(stdout)
    (bin_dir / f"{name}.stderr").write_text(stderr)
    script = bin_dir / name
    calls = bin_dir / f"{name}.calls"
    script.write_text(
        "#!/bin/sh\n"
        f"python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' \"$@\" >> {shlex.quote(str(calls))}\n"
        f"cat {shlex.quote(str(bin_dir / (name + '.stdout')))}\n"
        f"cat {shlex.quote(str(bin_dir / (name + '.stderr')))} >&2\n"
        f"exit {rc}\n")
    script.chmod(0o755)
    return script


def calls(bin_dir: Path, name: str) -> list[list[str]]:
    path = bin_dir / f"{name}.calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- helpers ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "minutes"), [
    ("1", 1), ("30:00", 30), ("1:00:00", 60), ("1-00:00:00", 1440), ("2-03", 3060), ("0:30", 1),
    ("UNLIMITED", None), ("N/A", None), ("", None), ("INVALID", None), ("1-02:03", 1563),
])
def test_parse_duration_min(text, minutes):
    assert parse_duration_min(text) == minutes


def test_parse_hms_min():
    assert parse_hms_min("01:00:00") == 60
    assert parse_hms_min("00:30:01") == 31
    assert parse_hms_min("N/A") is None


# --- slurm (captured from the real Slurm of scripts/slurm.sh) ---------------------------------
SLURM_IDS = golden("slurm", "ids.txt").strip().split(",")
OK_ID, FAILED_ID, TIMEOUT_ID, CANCELLED_ID, RUNNING_ID, PENDING_ID, HELD_ID = SLURM_IDS


def test_slurm_submit_output():
    assert slurm.parse_submit_output(golden("slurm", "sbatch_ok.out")) == OK_ID
    assert slurm.parse_submit_output("Submitted batch job 42\n") == "42"
    assert slurm.parse_submit_output("42;cluster1\n") == "42"
    assert slurm.parse_submit_output("") is None
    assert slurm.parse_submit_output("sbatch: error: something\n") is None


def test_slurm_squeue_states():
    jobs = slurm.parse_squeue_output(golden("slurm", "squeue_states.out"))
    assert jobs is not None
    assert jobs[OK_ID].state == "finished" and jobs[OK_ID].exit_code == 0
    assert jobs[OK_ID].start_time is not None and jobs[OK_ID].end_time is not None
    assert jobs[OK_ID].end_time >= jobs[OK_ID].start_time
    assert jobs[FAILED_ID].state == "failed"
    assert jobs[TIMEOUT_ID].state == "finished" and "TIMEOUT" in jobs[TIMEOUT_ID].message
    assert jobs[RUNNING_ID].state == "running" and jobs[RUNNING_ID].num_nodes == 2
    assert jobs[RUNNING_ID].start_time is not None and jobs[RUNNING_ID].end_time is None
    assert jobs[RUNNING_ID].wall_time_min == 10
    assert jobs[HELD_ID].state == "queued" and "JobHeldUser" in jobs[HELD_ID].message
    assert jobs[HELD_ID].start_time is None
    for job in jobs.values():
        assert job.queue == "debug"
        assert job.submit_time is not None and job.submit_time.tzinfo is not None


def test_slurm_sacct_completion_has_exit_codes():
    jobs = slurm.parse_sacct_output(golden("slurm", "sacct_completion.out"))
    assert jobs is not None
    assert jobs[OK_ID].state == "finished" and jobs[OK_ID].exit_code == 0
    assert jobs[FAILED_ID].state == "failed" and jobs[FAILED_ID].exit_code == 3
    assert jobs[TIMEOUT_ID].state == "finished"
    assert RUNNING_ID not in jobs or jobs[RUNNING_ID].state != "running"  # jobcomp lists ended jobs only


def test_slurm_exit_codes():
    assert slurm.parse_exit_code("0:0") == 0
    assert slurm.parse_exit_code("3:0") == 3
    assert slurm.parse_exit_code("0:15") == 143
    assert slurm.parse_exit_code("garbage") is None


@pytest.mark.parametrize(("raw", "state"), [
    ("PENDING", "queued"), ("PD", "queued"), ("R", "running"), ("CG", "running"), ("CD", "finished"),
    ("F", "failed"), ("TO", "finished"), ("CA", "finished"), ("CANCELLED by 0", "finished"),
    ("NF", "failed"), ("OOM", "failed"), ("OUT_OF_MEMORY", "failed"), ("BOOT_FAIL", "failed"),
    ("PREEMPTED", "failed"), ("REQUEUED", "queued"), ("SUSPENDED", "running"), ("WEIRD", "unknown"), ("", "unknown"),
])
def test_slurm_state_map(raw, state):
    assert slurm.map_state(raw) == state


def test_slurm_sinfo_backfill():
    idle = slurm.parse_sinfo_output(golden("slurm", "sinfo_idle.out"), max_wall_time_min=120)
    assert idle == [BackfillWindow(num_nodes=4, wall_time_min=120, queue="debug")]
    busy = slurm.parse_sinfo_output(golden("slurm", "sinfo_busy.out"), max_wall_time_min=120)
    assert busy is not None
    assert sum(w.num_nodes for w in busy) < 4
    assert slurm.parse_sinfo_output("debug|up|30:00|3|idle\ndebug|up|30:00|1|idle*\n", max_wall_time_min=120) == [
        BackfillWindow(num_nodes=3, wall_time_min=30, queue="debug")]
    assert slurm.parse_sinfo_output("", max_wall_time_min=60) == []
    assert slurm.parse_sinfo_output("not sinfo output", max_wall_time_min=60) is None


def test_slurm_errors_are_recognised():
    assert slurm.is_gone_message(golden("slurm", "squeue_unknown.err"))
    assert golden("slurm", "scancel_unknown.err") == ""  # scancel of an unknown id: silent, exit 0
    assert slurm.is_gone_message(golden("slurm", "scancel_unknown_verbose.err"))
    assert not slurm.is_gone_message("slurm_load_jobs error: Unable to contact slurm controller (connect failure)")


def test_slurm_render_submit_argv():
    argv = slurm.render_submit_argv(Path("/s/p.sh"), project="proj", queue="debug", num_nodes=2, wall_time_min=30,
                                    job_name="pilot", cwd=Path("/s"), extra_flags=["--qos=x"])
    assert argv == ["sbatch", "--parsable", "--nodes=2", "--time=30", "--job-name=pilot", "--chdir=/s",
                    "--partition=debug", "--account=proj", "--qos=x", "/s/p.sh"]
    argv = slurm.render_submit_argv(Path("/s/p.sh"), project="", queue="", num_nodes=1, wall_time_min=5,
                                    job_name="p", cwd=Path("/s"))
    assert not any(a.startswith(("--partition", "--account")) for a in argv)
    assert "--qos=regular" in slurm.render_submit_argv(Path("/p"), project="", queue="regular", num_nodes=1,
                                                       wall_time_min=5, job_name="p", cwd=Path("/"),
                                                       queue_flag="--qos")


# --- slurm adapter flows against fake commands -------------------------------------------------
def test_slurm_adapter_submit_error_carries_message(tmp_path):
    fake_command(tmp_path, "sbatch", stderr=golden("slurm", "sbatch_bad_partition.err"), rc=1)
    sched = get_scheduler("slurm", bin_dir=str(tmp_path))
    with pytest.raises(SubmitError) as err:
        run(sched.submit(tmp_path / "x.sh", project="", queue="nosuchpartition", num_nodes=1, wall_time_min=5,
                         job_name="p", cwd=tmp_path))
    assert "Invalid partition name specified" in err.value.message
    assert err.value.returncode == 1


def test_slurm_adapter_submit_without_id_is_an_error(tmp_path):
    fake_command(tmp_path, "sbatch", stdout="hello\n")
    with pytest.raises(SubmitError, match="no job id"):
        run(get_scheduler("slurm", bin_dir=str(tmp_path)).submit(
            tmp_path / "x.sh", project="", queue="", num_nodes=1, wall_time_min=5, job_name="p", cwd=tmp_path))


def test_slurm_adapter_missing_binary_is_a_submit_error(tmp_path):
    with pytest.raises(SubmitError, match="cannot run"):
        run(get_scheduler("slurm", bin_dir=str(tmp_path / "nowhere")).submit(
            tmp_path / "x.sh", project="", queue="", num_nodes=1, wall_time_min=5, job_name="p", cwd=tmp_path))


def test_slurm_adapter_gone_jobs_resolved_from_jobcomp(tmp_path):
    # squeue no longer knows any of them; sacct (dbd) is disabled; sacct -c has the records.
    fake_command(tmp_path, "squeue", stderr=golden("slurm", "squeue_unknown.err"), rc=1)
    sacct = tmp_path / "sacct"
    sacct.write_text(
        "#!/bin/sh\n"
        "case \" $* \" in *' --completion '*) cat " + shlex.quote(str(GOLDEN / "slurm" / "sacct_completion.out")) +
        ";; *) cat " + shlex.quote(str(GOLDEN / "slurm" / "sacct_disabled.err")) + " >&2; exit 1;; esac\n")
    sacct.chmod(0o755)
    sched = get_scheduler("slurm", bin_dir=str(tmp_path))
    got = run(sched.statuses([OK_ID, FAILED_ID, "999999"]))
    assert got is not None
    assert got[OK_ID].state == "finished" and got[OK_ID].exit_code == 0
    assert got[FAILED_ID].state == "failed" and got[FAILED_ID].exit_code == 3
    assert got["999999"].state == "finished" and got["999999"].exit_code is None
    assert "no accounting record" in got["999999"].message


def test_slurm_adapter_controller_down_is_unknown(tmp_path):
    fake_command(tmp_path, "squeue", stderr="slurm_load_jobs error: Unable to contact slurm controller\n", rc=1)
    fake_command(tmp_path, "scancel", stderr="scancel: error: Unable to contact slurm controller\n", rc=1)
    fake_command(tmp_path, "sinfo", stderr="sinfo: error: Unable to contact slurm controller\n", rc=1)
    sched = get_scheduler("slurm", bin_dir=str(tmp_path))
    assert run(sched.statuses(["1"])) is None
    assert run(sched.statuses()) is None
    assert run(sched.backfill_windows()) is None
    with pytest.raises(SchedulerUnavailable):
        run(sched.cancel("1"))


def test_slurm_adapter_empty_and_garbage_output(tmp_path):
    fake_command(tmp_path, "squeue", stdout="")
    assert run(get_scheduler("slurm", bin_dir=str(tmp_path)).statuses()) == {}
    fake_command(tmp_path, "squeue", stdout="<html>proxy error</html>\n")
    assert run(get_scheduler("slurm", bin_dir=str(tmp_path)).statuses()) is None
    assert run(get_scheduler("slurm", bin_dir=str(tmp_path)).statuses(["5"])) is None


def test_slurm_adapter_cancel_of_gone_job_is_fine(tmp_path):
    fake_command(tmp_path, "scancel", stderr=golden("slurm", "scancel_unknown_verbose.err"), rc=1)
    run(get_scheduler("slurm", bin_dir=str(tmp_path)).cancel("999999"))
    assert calls(tmp_path, "scancel") == [["999999"]]


def test_slurm_adapter_timeout_is_unknown(tmp_path):
    (tmp_path / "squeue").write_text("#!/bin/sh\nsleep 30\n")
    (tmp_path / "squeue").chmod(0o755)
    sched = get_scheduler("slurm", bin_dir=str(tmp_path), timeout_s=0.5)
    assert run(sched.statuses(["1"])) is None


# --- pbs --------------------------------------------------------------------------------------
PBS_HOST = ".polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"


def test_pbs_submit_output():
    assert pbs.parse_submit_output(golden("pbs", "qsub_ok.out")) == "1234567" + PBS_HOST
    assert pbs.parse_submit_output("") is None
    assert pbs.parse_submit_output("qsub: Unknown queue\n") is None


def test_pbs_qstat_states():
    jobs = pbs.parse_qstat_json(golden("pbs", "qstat_states.json"))
    assert jobs is not None
    j = {k.split(".")[0]: v for k, v in jobs.items()}
    assert j["1234567"].state == "queued" and j["1234567"].num_nodes == 2 and j["1234567"].wall_time_min == 60
    assert j["1234567"].queue == "debug" and "Insufficient amount of resource" in j["1234567"].message
    assert j["1234567"].submit_time == local(2024, 11, 21, 10, 0, 0) and j["1234567"].start_time is None
    assert j["1234568"].state == "running" and j["1234568"].start_time == local(2024, 11, 21, 9, 50, 0)
    assert j["1234569"].state == "finished" and j["1234569"].exit_code == 0
    assert j["1234569"].end_time == local(2024, 11, 21, 8, 31, 4)
    assert j["1234570"].state == "failed" and j["1234570"].exit_code == 2
    assert j["1234571"].state == "queued"  # held
    assert j["1234572"].state == "running"  # exiting
    assert j["1234573"].state == "finished" and j["1234573"].exit_code == -29  # wall time


def test_pbs_qstat_owner_filter_and_empty():
    assert pbs.parse_qstat_json(golden("pbs", "qstat_states.json"), owner="bob") == {}
    assert len(pbs.parse_qstat_json(golden("pbs", "qstat_states.json"), owner="alice")) == 7
    assert pbs.parse_qstat_json(golden("pbs", "qstat_empty_user.json")) == {}
    assert pbs.parse_qstat_json("") is None
    assert pbs.parse_qstat_json("qstat: cannot connect") is None
    assert pbs.parse_qstat_json('{"Jobs": []}') is None


@pytest.mark.parametrize(("code", "state"), [
    ("Q", "queued"), ("H", "queued"), ("W", "queued"), ("R", "running"), ("E", "running"),
    ("F", "finished"), ("X", "finished"), ("Z", "unknown"),
])
def test_pbs_state_map(code, state):
    assert pbs.map_state(code) == state


def test_pbs_pbsnodes_backfill():
    assert pbs.parse_pbsnodes_json(golden("pbs", "pbsnodes.json"), wall_time_min=60, queue="debug") == [
        BackfillWindow(num_nodes=2, wall_time_min=60, queue="debug")]
    assert pbs.parse_pbsnodes_json("nope", wall_time_min=60) is None


def test_pbs_render_submit_argv():
    argv = pbs.render_submit_argv(Path("/s/p.sh"), project="datascience", queue="debug", num_nodes=2,
                                  wall_time_min=90, job_name="pilot", select_suffix=":system=polaris",
                                  extra_flags=["-l", "filesystems=home:eagle"])
    assert argv == ["qsub", "-N", "pilot", "-l", "select=2:system=polaris", "-l", "walltime=01:30:00",
                    "-q", "debug", "-A", "datascience", "-l", "filesystems=home:eagle", "/s/p.sh"]


def test_pbs_adapter_flows(tmp_path):
    sched = get_scheduler("pbs", bin_dir=str(tmp_path), user="alice")
    fake_command(tmp_path, "qsub", stdout=golden("pbs", "qsub_ok.out"))
    sid = run(sched.submit(tmp_path / "p.sh", project="p", queue="debug", num_nodes=2, wall_time_min=30,
                           job_name="pilot", cwd=tmp_path))
    assert sid == "1234567" + PBS_HOST
    fake_command(tmp_path, "qsub", stderr=golden("pbs", "qsub_no_filesystems.err"), rc=2)
    with pytest.raises(SubmitError, match="filesystems is required"):
        run(sched.submit(tmp_path / "p.sh", project="p", queue="debug", num_nodes=2, wall_time_min=30,
                         job_name="pilot", cwd=tmp_path))
    # One known job, one unknown to qstat (rc 153 with the known one still printed).
    fake_command(tmp_path, "qstat", stdout=golden("pbs", "qstat_partial.json"), stderr=golden("pbs", "qstat_partial.err"),
                 rc=153)
    got = run(sched.statuses(["1234568" + PBS_HOST, "999" + PBS_HOST]))
    assert got["1234568" + PBS_HOST].state == "running"
    assert got["999" + PBS_HOST].state == "finished" and got["999" + PBS_HOST].exit_code is None
    # Short ids match qstat's full ones.
    assert run(sched.statuses(["1234568"]))["1234568"].state == "running"
    fake_command(tmp_path, "qstat", stderr=golden("pbs", "qstat_unknown.err"), rc=153)
    assert run(sched.statuses(["999" + PBS_HOST]))["999" + PBS_HOST].state == "finished"
    fake_command(tmp_path, "qstat", stderr=golden("pbs", "qstat_server_down.err"), rc=1)
    assert run(sched.statuses(["1234568" + PBS_HOST])) is None
    assert run(sched.statuses()) is None
    fake_command(tmp_path, "qstat", stdout=golden("pbs", "qstat_partial.json"))
    assert run(sched.statuses(["1234567" + PBS_HOST])) is None  # absent without explanation: ask again
    fake_command(tmp_path, "qdel", stderr=golden("pbs", "qdel_unknown.err"), rc=153)
    run(sched.cancel("999" + PBS_HOST))
    fake_command(tmp_path, "qdel", stderr=golden("pbs", "qdel_finished.err"), rc=35)
    run(sched.cancel("1234569" + PBS_HOST))
    fake_command(tmp_path, "qdel", stderr=golden("pbs", "qstat_server_down.err"), rc=1)
    with pytest.raises(SchedulerUnavailable):
        run(sched.cancel("1234568" + PBS_HOST))
    fake_command(tmp_path, "pbsnodes", stdout=golden("pbs", "pbsnodes.json"))
    assert run(sched.backfill_windows())[0].num_nodes == 2


# --- cobalt -----------------------------------------------------------------------------------
def test_cobalt_submit_and_states():
    assert cobalt.parse_submit_output(golden("cobalt", "qsub_ok.out")) == "412345"
    assert cobalt.parse_submit_output("") is None
    now = datetime(2024, 11, 21, 12, 0, tzinfo=UTC)
    jobs = cobalt.parse_qstat_output(golden("cobalt", "qstat_states.out"), now=now)
    assert jobs is not None
    assert jobs["412340"].state == "running" and jobs["412340"].num_nodes == 128
    assert jobs["412340"].start_time == datetime(2024, 11, 21, 11, 40, tzinfo=UTC)
    assert jobs["412341"].state == "queued" and jobs["412341"].queue == "debug-cache-quad"
    assert jobs["412342"].state == "queued"
    assert jobs["412343"].state == "running"
    assert jobs["412344"].state == "running"
    assert jobs["412345"].state == "queued" and jobs["412345"].wall_time_min == 10
    assert cobalt.parse_qstat_output(golden("cobalt", "qstat_empty.out")) == {}
    assert cobalt.parse_qstat_output(golden("cobalt", "qstat_header_only.out")) == {}
    assert cobalt.parse_qstat_output("error: cannot reach cobalt\n") is None


def test_cobalt_nodelist_backfill():
    assert cobalt.parse_nodelist_output(golden("cobalt", "nodelist.out")) == [
        BackfillWindow(num_nodes=2, wall_time_min=46, queue="default"),
        BackfillWindow(num_nodes=1, wall_time_min=130, queue="default"),
    ]
    assert cobalt.parse_nodelist_output("") == []
    assert cobalt.parse_nodelist_output("garbage\nmore garbage\n") is None


def test_cobalt_adapter_flows(tmp_path):
    sched = get_scheduler("cobalt", bin_dir=str(tmp_path), user="alice")
    script = tmp_path / "p.sh"
    script.write_text("#!/bin/sh\n")
    fake_command(tmp_path, "qsub", stdout=golden("cobalt", "qsub_ok.out"), stderr=golden("cobalt", "qsub_ok.err"))
    assert run(sched.submit(script, project="p", queue="default", num_nodes=8, wall_time_min=30,
                            job_name="pilot", cwd=tmp_path)) == "412345"
    argv = calls(tmp_path, "qsub")[0]
    assert argv[argv.index("-n") + 1] == "8" and argv[argv.index("-t") + 1] == "30"
    fake_command(tmp_path, "qsub", stderr=golden("cobalt", "qsub_bad_project.err"), rc=1)
    with pytest.raises(SubmitError, match="not valid"):
        run(sched.submit(script, project="nosuchproject", queue="default", num_nodes=8, wall_time_min=30,
                         job_name="pilot", cwd=tmp_path))
    fake_command(tmp_path, "qstat", stdout=golden("cobalt", "qstat_states.out"))
    got = run(sched.statuses(["412340", "1"]))
    assert got["412340"].state == "running"
    assert got["1"].state == "finished" and got["1"].exit_code is None
    fake_command(tmp_path, "qstat", stderr="Failed to connect to cobalt\n", rc=1)
    assert run(sched.statuses(["412340"])) is None
    fake_command(tmp_path, "qdel", stdout=golden("cobalt", "qdel_ok.out"))
    run(sched.cancel("412340"))
    fake_command(tmp_path, "nodelist", stdout=golden("cobalt", "nodelist.out"))
    assert sum(w.num_nodes for w in run(sched.backfill_windows())) == 3


# --- lsf --------------------------------------------------------------------------------------
def test_lsf_submit_and_states():
    assert lsf.parse_submit_output(golden("lsf", "bsub_ok.out")) == "1102345"
    assert lsf.parse_submit_output(golden("lsf", "bsub_no_project.err")) is None
    now = datetime(2024, 11, 21, 12, 0, tzinfo=UTC)
    parsed = lsf.parse_bjobs_json(golden("lsf", "bjobs_states.json"), now=now)
    assert parsed is not None
    jobs, unknown = parsed
    assert unknown == set()
    assert jobs["1102340"].state == "running" and jobs["1102340"].num_nodes == 2
    assert jobs["1102340"].start_time == local(2024, 11, 21, 9, 50) and jobs["1102340"].end_time is None
    assert jobs["1102340"].wall_time_min == 120
    assert jobs["1102341"].state == "queued" and jobs["1102341"].start_time is None
    assert jobs["1102342"].state == "finished" and jobs["1102342"].exit_code == 0
    assert jobs["1102342"].end_time == local(2024, 11, 21, 8, 31)
    assert jobs["1102343"].state == "failed" and jobs["1102343"].exit_code == 2
    assert jobs["1102344"].state == "finished" and jobs["1102344"].exit_code == 140  # run limit
    assert jobs["1102345"].state == "queued"  # PSUSP


def test_lsf_time_without_year_is_in_the_past():
    now = datetime(2024, 1, 2, 12, 0, tzinfo=UTC)
    t = lsf.parse_lsf_time("Dec 31 23:00", now=now)
    assert t is not None and t.year == 2023
    assert lsf.parse_lsf_time("", now=now) is None
    assert lsf.parse_lsf_time("tomorrow", now=now) is None


@pytest.mark.parametrize(("stat", "state"), [
    ("PEND", "queued"), ("PSUSP", "queued"), ("RUN", "running"), ("USUSP", "running"), ("SSUSP", "running"),
    ("DONE", "finished"), ("EXIT", "failed"), ("UNKWN", "unknown"), ("ZOMBI", "unknown"),
])
def test_lsf_state_map(stat, state):
    assert lsf.map_state(stat) == state


def test_lsf_adapter_flows(tmp_path):
    sched = get_scheduler("lsf", bin_dir=str(tmp_path), user="alice")
    script = tmp_path / "p.sh"
    script.write_text("#!/bin/sh\n")
    fake_command(tmp_path, "bsub", stdout=golden("lsf", "bsub_ok.out"))
    assert run(sched.submit(script, project="p", queue="batch", num_nodes=2, wall_time_min=30,
                            job_name="pilot", cwd=tmp_path)) == "1102345"
    for err in ("bsub_no_project.err", "bsub_bad_queue.err"):
        fake_command(tmp_path, "bsub", stderr=golden("lsf", err), rc=255)
        with pytest.raises(SubmitError, match="Job not submitted"):
            run(sched.submit(script, project="", queue="nosuchqueue", num_nodes=2, wall_time_min=30,
                             job_name="pilot", cwd=tmp_path))
    fake_command(tmp_path, "bjobs", stdout=golden("lsf", "bjobs_partial.json"), rc=255)
    got = run(sched.statuses(["1102340", "999"]))
    assert got["1102340"].state == "running"
    assert got["999"].state == "finished" and got["999"].exit_code is None
    fake_command(tmp_path, "bjobs", stderr=golden("lsf", "bjobs_none.err"), rc=255)
    assert run(sched.statuses()) == {}
    fake_command(tmp_path, "bjobs", stderr=golden("lsf", "bjobs_daemon_down.err"), rc=255)
    assert run(sched.statuses(["1102340"])) is None
    assert run(sched.statuses()) is None
    for err in ("bkill_finished.err", "bkill_unknown.err"):
        fake_command(tmp_path, "bkill", stderr=golden("lsf", err), rc=255)
        run(sched.cancel("1"))
    fake_command(tmp_path, "bkill", stderr=golden("lsf", "bjobs_daemon_down.err"), rc=255)
    with pytest.raises(SchedulerUnavailable):
        run(sched.cancel("1"))
    assert run(sched.backfill_windows()) == []


# --- empty ids, options -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["slurm", "pbs", "cobalt", "lsf"])
def test_no_ids_asks_nothing(tmp_path, name):
    # An empty id list is answered without running any command (bin_dir has none).
    assert run(get_scheduler(name, bin_dir=str(tmp_path)).statuses([])) == {}


def test_get_scheduler_rejects_unknown_names_and_options(tmp_path):
    with pytest.raises(Exception, match="unknown scheduler"):
        get_scheduler("condor")
    with pytest.raises(Exception, match="bad options for the slurm scheduler"):
        get_scheduler("slurm", no_such_option=1)
    with pytest.raises(Exception, match="bad options for the slurm scheduler"):
        get_scheduler("slurm", accounting="maybe")
    with pytest.raises(Exception, match="state_dir"):
        get_scheduler("local")
    assert set(SCHEDULER_NAMES) == {"local", "slurm", "pbs", "cobalt", "lsf"}


# --- templates --------------------------------------------------------------------------------
def test_template_placeholders_and_blocks():
    text = "a={{ a }}\n{% if b %}\nb={{ b }}\n{% else %}\nno b\n{% endif %}\nend"
    assert render_template(text, {"a": 1, "b": "x"}) == "a=1\nb=x\nend"
    assert render_template(text, {"a": None, "b": ""}) == "a=\nno b\nend"
    nested = "{% if a %}A{% if b %}B{% endif %}{% endif %}."
    assert render_template(nested, {"a": 1, "b": 0}) == "A."
    assert render_template(nested, {"a": 0, "b": 1}) == "."


@pytest.mark.parametrize(("text", "match"), [
    ("{{ missing }}", "missing"), ("{% if a %}x", "endif"), ("{% endif %}", "unknown tag .endif."), ("{% else %}", "unknown tag .else."),
])
def test_template_errors(text, match):
    with pytest.raises(TemplateError, match=match):
        render_template(text, {"a": 1})


CONTEXT = {"launcher_command": "python -m balsam_grpc.launcher --mode mpi", "num_nodes": 2, "wall_time_min": 90,
           "queue": "debug", "project": "", "job_name": "pilot-7", "workdir": "/home/a/site", "env": {"A": "x y"}}


@pytest.mark.parametrize("name", ["slurm", "pbs", "cobalt", "lsf", "local"])
def test_default_templates_render(tmp_path, name):
    opts = {"state_dir": tmp_path} if name == "local" else {}
    sched = get_scheduler(name, **opts)
    text = sched.render_script(read_template(f"{name}.sh"), CONTEXT)
    assert text.startswith("#!/bin/bash\n")
    assert "python -m balsam_grpc.launcher --mode mpi" in text
    assert "export A='x y'" in text
    assert "{{" not in text and "{%" not in text
    assert "-A" not in text and "--account" not in text and "-P " not in text  # no project given
    if name == "slurm":
        assert "#SBATCH --nodes=2" in text and "#SBATCH --time=90" in text and "#SBATCH --partition=debug" in text
    if name == "pbs":
        assert "#PBS -l walltime=01:30:00" in text and "#PBS -l select=2\n" in text


# --- platforms --------------------------------------------------------------------------------
def test_all_presets_load_and_render(tmp_path):
    names = list_platforms()
    assert {"local", "polaris", "aurora", "perlmutter", "frontier", "slurm", "pbs"} <= set(names)
    for name in names:
        p = load_platform(name)
        assert p["name"] == name
        opts = dict(p["scheduler_options"])
        if p["scheduler"] == "local":
            opts["state_dir"] = tmp_path
        sched = get_scheduler(p["scheduler"], **opts)
        text = sched.render_script(p["batch_script"], {**CONTEXT, "queue": p["default_queue"], "preamble": p["preamble"]})
        assert CONTEXT["launcher_command"] in text
        if p["queues"]:
            assert p["default_queue"] in p["queues"]
    polaris = load_platform("polaris")
    assert polaris["scheduler"] == "pbs" and polaris["mpi_launch"] == "pals" and polaris["gpus_per_node"] == 4
    assert polaris["queues"]["debug"] == {"max_nodes": 2, "max_wall_time_min": 60, "max_queued": 1}
    assert load_platform("perlmutter")["scheduler_options"]["queue_flag"] == "--qos"


def test_platform_errors_name_file_and_key(tmp_path):
    good = load_platform("slurm")
    with pytest.raises(PlatformError, match="x.yml: queues.debug.max_nodes: must be an integer"):
        validate_platform({**good, "queues": {"debug": {"max_nodes": "many", "max_wall_time_min": 5}}}, "x.yml")
    with pytest.raises(PlatformError, match="x.yml: scheduler: 'condor' is not one of"):
        validate_platform({**good, "scheduler": "condor"}, "x.yml")
    with pytest.raises(PlatformError, match="x.yml: sheduler: unknown key"):
        validate_platform({**good, "sheduler": "slurm"}, "x.yml")
    missing = dict(good)
    del missing["mpi_launch"]
    with pytest.raises(PlatformError, match="mpi_launch: missing"):
        validate_platform(missing, "x.yml")
    with pytest.raises(PlatformError, match="default_queue: 'nope' is not in queues"):
        validate_platform({**good, "default_queue": "nope"}, "x.yml")
    with pytest.raises(PlatformError, match="batch_script: uses {{ bogus }}"):
        validate_platform({**good, "batch_script": "{{ bogus }} {{ launcher_command }}"}, "x.yml")
    with pytest.raises(PlatformError, match="never uses {{ launcher_command }}"):
        validate_platform({**good, "batch_script": "#!/bin/sh\n"}, "x.yml")
    bad = tmp_path / "mine.yml"
    bad.write_text("name: mine\nscheduler: [unclosed\n")
    with pytest.raises(PlatformError, match="mine.yml: not valid YAML"):
        load_platform(bad)
    with pytest.raises(PlatformError, match="no such platform preset"):
        load_platform("summit-2")


# --- fuzz: parsers never raise ------------------------------------------------------------------
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400)
LINES = st.lists(st.sampled_from(["|", "R", "PD", "debug", "1", "2024-11-21T10:00:00", "N/A", "idle", "up", "=====",
                                  "{", "}", '"Jobs"', ":", "Q", "running", "0:46:50", "\n", " ", "RECORDS", "[", "]"]),
                 max_size=60).map("".join)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(TEXT, LINES))
def test_parsers_never_raise(text):
    now = datetime(2024, 11, 21, tzinfo=UTC)
    results = [
        slurm.parse_submit_output(text), slurm.parse_squeue_output(text), slurm.parse_sacct_output(text),
        slurm.parse_sinfo_output(text, max_wall_time_min=60), pbs.parse_submit_output(text), pbs.parse_qstat_json(text),
        pbs.parse_pbsnodes_json(text, wall_time_min=60), cobalt.parse_submit_output(text),
        cobalt.parse_qstat_output(text, now=now), cobalt.parse_nodelist_output(text), lsf.parse_submit_output(text),
        lsf.parse_bjobs_json(text, now=now), parse_duration_min(text), parse_hms_min(text),
    ]
    for jobs in (results[1], results[2], results[5], results[8]):
        assert jobs is None or all(j.state in ("queued", "running", "finished", "failed", "unknown")
                                   for j in jobs.values())


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                       lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                       max_leaves=20)


@FUZZ
@given(st.dictionaries(st.sampled_from(["Jobs", "nodes", "RECORDS", "x"]),
                       st.one_of(JSONISH, st.dictionaries(st.text(max_size=10), JSONISH, max_size=3)), max_size=3))
def test_json_parsers_never_raise_on_odd_documents(doc):
    text = json.dumps(doc)
    now = datetime(2024, 11, 21, tzinfo=UTC)
    pbs.parse_qstat_json(text)
    pbs.parse_pbsnodes_json(text, wall_time_min=60)
    lsf.parse_bjobs_json(text, now=now)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["R", "PENDING", "COMPLETED", "FAILED", "TIMEOUT", "???", ""]),
                          st.sampled_from(["", "N/A", "2024-11-21T10:00:00", "Unknown", "1-00:00:00", "zzz"])),
                max_size=5))
def test_squeue_lines_with_odd_fields(rows):
    text = "\n".join(f"{i + 1}|{s}|debug|1|{t}|{t}|{t}|{t}|None" for i, (s, t) in enumerate(rows))
    jobs = slurm.parse_squeue_output(text)
    if jobs is not None:
        for job in jobs.values():
            # Times appear only where the state says the job has them.
            if job.state == "queued":
                assert job.start_time is None and job.end_time is None
            if job.state == "running":
                assert job.end_time is None


# --- optional scheduler parameters as directives ------------------------------------------------
def test_render_directives_per_scheduler(tmp_path):
    params = {"qos": "debug", "constraint": "gpu"}
    assert get_scheduler("slurm").render_directives(params) == "#SBATCH --constraint=gpu\n#SBATCH --qos=debug"
    assert get_scheduler("pbs").render_directives({"filesystems": "home:eagle"}) == "#PBS -l filesystems=home:eagle"
    assert get_scheduler("cobalt").render_directives({"mcdram": "cache"}) == "#COBALT --attrs mcdram=cache"
    assert get_scheduler("lsf").render_directives({"alloc_flags": "smt4"}) == "#BSUB -alloc_flags smt4"
    assert get_scheduler("local", state_dir=tmp_path).render_directives(params) == ""


@pytest.mark.parametrize("params", [{"qos": "x\nrm -rf ~"}, {"qos": "$(id)"}, {"--x": "1"}, {"a;b": "1"},
                                    {"qos": "a`b`"}])
def test_render_directives_refuses_injection(params):
    with pytest.raises(Exception, match="scheduler parameter"):
        get_scheduler("slurm").render_directives(params)


# --- find_by_name: a pilot looked up by its scheduler job name after a crash mid-submit ---------
from balsam_grpc.site.schedulers import (  # noqa: E402 - with the tests it serves
    SchedulerJob,
    adoption_order,
    pilot_job_name,
    submitted_since,
)

FIND_A, FIND_B, FIND_C, FIND_D = golden("slurm", "find_ids.txt").strip().split(",")


def test_pilot_job_name_is_deterministic_safe_and_keeps_the_id():
    assert pilot_job_name("polaris", 7) == "balsam-polaris-7" == pilot_job_name("polaris", 7)
    assert pilot_job_name("my site [x]; rm", 7) == "balsam-my_site_x_rm-7"
    long = pilot_job_name("s" * 200, 123456789)
    assert len(long) == 64 and long.endswith("-123456789")
    assert pilot_job_name("", 3) == "balsam-site-3"


@FUZZ
@given(st.text(max_size=120), st.integers(min_value=1, max_value=10**12), st.integers(min_value=1, max_value=10**12))
def test_pilot_job_names_are_scheduler_safe_and_distinct(site, a, b):
    name = pilot_job_name(site, a)
    assert len(name) <= 64 and name.startswith("balsam-") and name.endswith(f"-{a}")
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name)
    assert (pilot_job_name(site, b) == name) == (a == b)


def test_adoption_order_and_submit_time_guard():
    t = datetime(2026, 1, 1, 12, tzinfo=UTC)
    jobs = [SchedulerJob("12", "finished", submit_time=t), SchedulerJob("10", "queued", submit_time=t),
            SchedulerJob("9", "running", submit_time=t)]
    assert [j.scheduler_id for j in adoption_order(jobs)] == ["9", "10", "12"]  # live first, oldest first
    old = SchedulerJob("1", "queued", submit_time=datetime(2025, 1, 1, tzinfo=UTC))
    undated = SchedulerJob("2", "queued")
    assert submitted_since([old, undated, *jobs], t.timestamp()) == [undated, *jobs]
    assert submitted_since([old], None) == [old]


# slurm (captured: tests/site/golden/slurm/capture_find.sh)
def test_slurm_find_parsers_on_captures():
    live = slurm.parse_squeue_by_name(golden("slurm", "squeue_by_name.out"), "balsam-golden-7")
    assert live is not None
    by_id = {j.scheduler_id: j for j in live}
    assert set(by_id) == {FIND_A, FIND_C, FIND_D}  # squeue --name is exact: not B (balsam-golden-70)
    assert by_id[FIND_A].state == "finished" and by_id[FIND_C].state == "running"
    assert by_id[FIND_D].state == "queued" and "JobHeldUser" in by_id[FIND_D].message
    assert all(j.name == "balsam-golden-7" and j.submit_time is not None for j in live)
    assert adoption_order(live)[0].scheduler_id == FIND_C  # live, lowest id
    assert slurm.parse_squeue_by_name(golden("slurm", "squeue_by_name_none.out"), "balsam-golden-nosuch") == []
    assert slurm.parse_squeue_by_name("garbage\n", "x") is None
    # jobcomp ignores --name: the parser keeps the exact name only.
    ended = slurm.parse_sacct_by_name(golden("slurm", "sacct_completion_by_name.out"), "balsam-golden-7")
    assert [(j.scheduler_id, j.state, j.exit_code) for j in ended] == [(FIND_A, "finished", 0)]
    assert [j.scheduler_id for j in slurm.parse_sacct_by_name(
        golden("slurm", "sacct_completion_by_name.out"), "balsam-golden-70")] == [FIND_B]
    assert slurm.parse_sacct_by_name(golden("slurm", "sacct_completion_by_name.out"), "balsam-golden-nosuch") == []
    assert slurm.parse_sacct_by_name("1|2|3\n", "x") is None
    assert "disabled" in golden("slurm", "sacct_by_name_disabled.err")


def test_slurm_find_argv():
    assert slurm.render_find_argv("balsam-s-7", "alice") == [
        "squeue", "--noheader", "--states=all", "--format=%i|%T|%P|%D|%l|%V|%S|%e|%r|%j", "--name=balsam-s-7",
        "--user=alice"]
    assert slurm.render_sacct_find_argv("balsam-s-7", "alice", jobcomp=True, since=datetime(2026, 1, 2, 3, 4, 5)) == [
        "sacct", "--completion", "--noheader", "--parsable2",
        "--format=JobID,State,Partition,NNodes,Timelimit,Submit,Start,End,ExitCode,JobName", "--name=balsam-s-7",
        "--user=alice", "--starttime=2026-01-02T03:04:05"]
    assert "--allocations" in slurm.render_sacct_find_argv("n", "u", jobcomp=False, since=None)


def _fake_sacct(bin_dir: Path, *, dbd: str = "disabled", jobcomp: str = "capture") -> None:
    """sacct answering per source: "disabled" (the capture's error), "down", or the capture."""
    def branch(mode: str) -> str:
        if mode == "disabled":
            return f"cat {shlex.quote(str(GOLDEN / 'slurm' / 'sacct_by_name_disabled.err'))} >&2; exit 1"
        if mode == "down":
            return "echo 'sacct: error: Problem talking to the database: Connection refused' >&2; exit 1"
        return f"cat {shlex.quote(str(GOLDEN / 'slurm' / 'sacct_completion_by_name.out'))}"
    sacct = bin_dir / "sacct"
    sacct.write_text("#!/bin/sh\n"
                     f"echo \"$*\" >> {shlex.quote(str(bin_dir / 'sacct.calls'))}\n"
                     f"case \" $* \" in *' --completion '*) {branch(jobcomp)};; *) {branch(dbd)};; esac\n")
    sacct.chmod(0o755)


def test_slurm_adapter_find_by_name(tmp_path):
    sched = get_scheduler("slurm", bin_dir=str(tmp_path), user="alice")
    fake_command(tmp_path, "squeue", stdout=golden("slurm", "squeue_by_name.out"))
    found = run(sched.find_by_name("balsam-golden-7"))
    assert {j.scheduler_id for j in found} == {FIND_A, FIND_C, FIND_D}
    assert calls(tmp_path, "squeue")[-1][-2:] == ["--name=balsam-golden-7", "--user=alice"]
    assert not (tmp_path / "sacct.calls").exists()  # found live: accounting not asked
    # Gone from squeue: accounting (dbd disabled, jobcomp has it) finds the ended one.
    fake_command(tmp_path, "squeue", stdout="")
    _fake_sacct(tmp_path)
    found = run(sched.find_by_name("balsam-golden-7", submitted_after=0))
    assert [(j.scheduler_id, j.state) for j in found] == [(FIND_A, "finished")]
    assert run(sched.find_by_name("balsam-golden-nosuch")) == []  # definitive: never submitted
    # The controller cannot answer: nothing is known.
    fake_command(tmp_path, "squeue", stderr="slurm_load_jobs error: Unable to contact slurm controller\n", rc=1)
    assert run(sched.find_by_name("balsam-golden-7")) is None


def test_slurm_adapter_find_by_name_accounting_modes(tmp_path):
    fake_command(tmp_path, "squeue", stdout="")
    _fake_sacct(tmp_path, dbd="down", jobcomp="down")
    assert run(get_scheduler("slurm", bin_dir=str(tmp_path)).find_by_name("balsam-golden-7")) is None
    _fake_sacct(tmp_path, dbd="disabled", jobcomp="disabled")
    assert run(get_scheduler("slurm", bin_dir=str(tmp_path)).find_by_name("balsam-golden-7")) == []
    _fake_sacct(tmp_path, dbd="down", jobcomp="capture")
    assert run(get_scheduler("slurm", bin_dir=str(tmp_path), accounting="sacct").find_by_name("x")) is None
    assert run(get_scheduler("slurm", bin_dir=str(tmp_path), accounting="none").find_by_name("x")) == []


# pbs (written from the PBS Pro reference)
def test_pbs_find_parsers_and_argv():
    ids = pbs.parse_qselect_output(golden("pbs", "qselect_by_name.out"))
    assert ids == ["1234580" + PBS_HOST, "1234581" + PBS_HOST]
    assert pbs.parse_qselect_output(golden("pbs", "qselect_none.out")) == []
    assert pbs.parse_qselect_output(golden("pbs", "qselect_server_down.err")) is None
    found = pbs.parse_qstat_by_name(golden("pbs", "qstat_by_name.json"), "balsam-polaris-7")
    assert {(j.scheduler_id.split(".")[0], j.state) for j in found} == {("1234580", "finished"), ("1234581", "queued")}
    assert all(j.name == "balsam-polaris-7" for j in found)
    assert pbs.parse_qstat_by_name(golden("pbs", "qstat_by_name.json"), "balsam-polaris-70") == []
    assert pbs.parse_qstat_by_name("nope", "x") is None
    assert pbs.render_select_argv("balsam-polaris-7", "alice") == ["qselect", "-N", "balsam-polaris-7", "-u", "alice",
                                                                    "-x"]


def test_pbs_adapter_find_by_name(tmp_path):
    sched = get_scheduler("pbs", bin_dir=str(tmp_path), user="alice")
    fake_command(tmp_path, "qselect", stdout=golden("pbs", "qselect_by_name.out"))
    fake_command(tmp_path, "qstat", stdout=golden("pbs", "qstat_by_name.json"))
    found = run(sched.find_by_name("balsam-polaris-7"))
    assert adoption_order(found)[0].scheduler_id == "1234581" + PBS_HOST  # the live one
    assert calls(tmp_path, "qstat")[-1] == ["-f", "-F", "json", "-x", "1234580" + PBS_HOST, "1234581" + PBS_HOST]
    # An id that left history between qselect and qstat: it existed, so it counts (ended).
    fake_command(tmp_path, "qselect", stdout=f"999{PBS_HOST}\n")
    fake_command(tmp_path, "qstat", stderr=golden("pbs", "qstat_unknown.err"), rc=153)
    assert [(j.scheduler_id, j.state) for j in run(sched.find_by_name("balsam-polaris-7"))] == [
        ("999" + PBS_HOST, "finished")]
    # qstat silent about a listed id: ask again.
    fake_command(tmp_path, "qstat", stdout=golden("pbs", "qstat_empty_user.json"))
    assert run(sched.find_by_name("balsam-polaris-7")) is None
    fake_command(tmp_path, "qselect", stdout=golden("pbs", "qselect_none.out"))
    before = len(calls(tmp_path, "qstat"))
    assert run(sched.find_by_name("balsam-polaris-7")) == [] and len(calls(tmp_path, "qstat")) == before
    fake_command(tmp_path, "qselect", stderr=golden("pbs", "qselect_server_down.err"), rc=1)
    assert run(sched.find_by_name("balsam-polaris-7")) is None


# cobalt (written from the Cobalt user guide)
def test_cobalt_find_by_name(tmp_path):
    out = golden("cobalt", "qstat_by_name.out")
    assert [(j.scheduler_id, j.state) for j in cobalt.parse_qstat_by_name(out, "balsam-theta-7")] == [
        ("412350", "running")]
    assert [j.scheduler_id for j in cobalt.parse_qstat_by_name(out, "my analysis run")] == ["412352"]
    assert cobalt.parse_qstat_by_name(out, "balsam-theta-8") == []
    assert cobalt.parse_qstat_by_name(golden("cobalt", "qstat_empty.out"), "x") == []
    assert cobalt.parse_qstat_by_name("error: cannot reach cobalt\n", "x") is None
    sched = get_scheduler("cobalt", bin_dir=str(tmp_path), user="alice")
    fake_command(tmp_path, "qstat", stdout=out)
    assert [j.scheduler_id for j in run(sched.find_by_name("balsam-theta-7"))] == ["412350"]
    assert calls(tmp_path, "qstat")[-1] == ["-u", "alice", "--header",
                                            "JobID:Queue:Nodes:WallTime:RunTime:State:JobName"]
    fake_command(tmp_path, "qstat", stderr="Failed to connect to cobalt\n", rc=1)
    assert run(sched.find_by_name("balsam-theta-7")) is None


# lsf (written from the LSF 10.1 reference)
def test_lsf_find_by_name(tmp_path):
    now = datetime(2024, 11, 21, 12, 0, tzinfo=UTC)
    found = lsf.parse_bjobs_by_name(golden("lsf", "bjobs_by_name.json"), "", "balsam-summit-7", now=now)
    assert [(j.scheduler_id, j.state) for j in found] == [("1102350", "running"), ("1102351", "finished")]
    assert lsf.parse_bjobs_by_name(golden("lsf", "bjobs_by_name.json"), "", "balsam-summit-8", now=now) == []
    assert lsf.parse_bjobs_by_name(golden("lsf", "bjobs_by_name_none.json"), "", "balsam-summit-8") == []
    assert lsf.parse_bjobs_by_name("", golden("lsf", "bjobs_by_name_none.err"), "balsam-summit-8") == []
    assert lsf.parse_bjobs_by_name("", golden("lsf", "bjobs_daemon_down.err"), "balsam-summit-8") is None
    sched = get_scheduler("lsf", bin_dir=str(tmp_path), user="alice")
    fake_command(tmp_path, "bjobs", stdout=golden("lsf", "bjobs_by_name.json"))
    assert [j.scheduler_id for j in run(sched.find_by_name("balsam-summit-7"))] == ["1102350", "1102351"]
    argv = calls(tmp_path, "bjobs")[-1]
    assert argv[argv.index("-J") + 1] == "balsam-summit-7" and argv[argv.index("-u") + 1] == "alice"
    assert argv[argv.index("-o") + 1].endswith(" job_name")
    fake_command(tmp_path, "bjobs", stderr=golden("lsf", "bjobs_by_name_none.err"), rc=255)
    assert run(sched.find_by_name("balsam-summit-8")) == []
    fake_command(tmp_path, "bjobs", stderr=golden("lsf", "bjobs_daemon_down.err"), rc=255)
    assert run(sched.find_by_name("balsam-summit-8")) is None


def test_every_submit_argv_carries_the_job_name():
    name = pilot_job_name("polaris", 7)
    kw = dict(project="p", queue="q", num_nodes=2, wall_time_min=30, job_name=name)
    assert f"--job-name={name}" in slurm.render_submit_argv(Path("/s/p.sh"), cwd=Path("/s"), **kw)
    pbs_argv = pbs.render_submit_argv(Path("/s/p.sh"), **kw)
    assert pbs_argv[pbs_argv.index("-N") + 1] == name
    cobalt_argv = cobalt.render_submit_argv(Path("/s/p.sh"), cwd=Path("/s"), **kw)
    assert cobalt_argv[cobalt_argv.index("--jobname") + 1] == name
    lsf_argv = lsf.render_submit_argv(Path("/s/p.sh"), cwd=Path("/s"), **kw)
    assert lsf_argv[lsf_argv.index("-J") + 1] == name


@FUZZ
@given(st.one_of(TEXT, LINES), st.sampled_from(["balsam-s-1", "x", "my analysis run", ""]))
def test_find_parsers_never_raise_and_only_return_the_name(text, name):
    now = datetime(2024, 11, 21, tzinfo=UTC)
    for found in (slurm.parse_squeue_by_name(text, name), slurm.parse_sacct_by_name(text, name),
                  pbs.parse_qstat_by_name(text, name), cobalt.parse_qstat_by_name(text, name, now=now),
                  lsf.parse_bjobs_by_name(text, text, name, now=now)):
        assert found is None or all(j.name == name and j.state in ("queued", "running", "finished", "failed",
                                                                   "unknown") for j in found)
    ids = pbs.parse_qselect_output(text)
    assert ids is None or all(i and i[0].isdigit() for i in ids)


@FUZZ
@given(st.dictionaries(st.sampled_from(["Jobs", "RECORDS", "x"]),
                       st.one_of(JSONISH, st.lists(st.dictionaries(st.sampled_from(
                           ["JOBID", "STAT", "ERROR", "JOB_NAME", "Job_Name", "job_state"]), JSONISH, max_size=4),
                           max_size=3)), max_size=3))
def test_find_json_parsers_never_raise_on_odd_documents(doc):
    text = json.dumps(doc)
    for found in (pbs.parse_qstat_by_name(text, "n"), lsf.parse_bjobs_by_name(text, "", "n")):
        assert found is None or all(j.name == "n" for j in found)


# local: its job records hold the name
def test_local_find_by_name_waits_for_a_submission_under_way_and_skips_dead_ones(tmp_path):
    import os
    import time as _time

    from balsam_grpc.site.schedulers.local_state import write_record

    sched = get_scheduler("local", state_dir=str(tmp_path), timeout_s=1.0)
    assert run(sched.find_by_name("balsam-l-1")) == []
    (tmp_path / "1.json").write_text("")  # an id just allocated, record not written yet
    assert run(sched.find_by_name("balsam-l-1")) is None  # could be ours: cannot say yet
    old = _time.time() - 60
    os.utime(tmp_path / "1.json", (old, old))
    assert run(sched.find_by_name("balsam-l-1")) == []  # a stale placeholder is nobody's
    rec = {"scheduler_id": "2", "job_name": "balsam-l-1", "submit_time": datetime.now(UTC).isoformat()}
    write_record(tmp_path / "2.json", rec)
    assert run(sched.find_by_name("balsam-l-1")) is None  # its monitor may still be starting
    write_record(tmp_path / "2.json", {**rec, "submit_time": datetime.fromtimestamp(old, UTC).isoformat()})
    assert run(sched.find_by_name("balsam-l-1")) == []  # never started, never will: not adopted
    assert json.loads((tmp_path / "2.json").read_text())["end_reason"].startswith("never started")
    write_record(tmp_path / "3.json", {**rec, "scheduler_id": "3", "pid": 1, "end_time": rec["submit_time"],
                                       "exit_code": 0, "end_reason": "exited"})
    found = run(sched.find_by_name("balsam-l-1"))
    assert [(j.scheduler_id, j.state, j.name) for j in found] == [("3", "finished", "balsam-l-1")]
    assert run(sched.find_by_name("balsam-l-2")) == []
