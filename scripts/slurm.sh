#!/usr/bin/env bash
# A real Slurm on this host, on loopback, with four fake nodes (node1..node4): for the slurm
# scheduler adapter's tests, the end-to-end tests and local experiments.
#
# Usage: scripts/slurm.sh install|start|stop|status|conf
#   install  apt-get install slurmctld slurmd slurm-client munge if any is missing
#   start    install if needed, write the config, start munged, slurmctld and one slurmd per
#            node, wait until sinfo shows the nodes idle. Fast and harmless when already up.
#   stop     stop the slurmd's, slurmctld and munged started here
#   status   sinfo and squeue (exit 1 when the controller does not answer)
#   conf     print the slurm.conf this script writes
#
# Needs root (it writes /etc/slurm/slurm.conf and runs the daemons as root, SlurmUser=root);
# re-runs itself under passwordless sudo when available.
# Env: BALSAM_SLURM_DIR (default /var/tmp/balsam-slurm) holds pid files, spool, state, logs and
#      the job-completion file that `sacct -c` reads; BALSAM_SLURM_NODES (default 4);
#      BALSAM_SLURM_CPUS (CPUs claimed per fake node, default 4: SlurmdParameters=config_overrides
#      lets a node claim more than the host has); BALSAM_SLURM_WAIT (seconds, default 60).
# No systemd is needed or used. Facts behind the settings: DESIGN.md section 8.
set -euo pipefail

STATE=${BALSAM_SLURM_DIR:-/var/tmp/balsam-slurm}
NODES=${BALSAM_SLURM_NODES:-4}
CPUS=${BALSAM_SLURM_CPUS:-4}
WAIT=${BALSAM_SLURM_WAIT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# written by balsam-grpc scripts/slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)
MUNGE_PID=/run/munge/munged.pid

log() { printf 'slurm.sh: %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (writes $CONF, starts daemons)"; }

node_names() {
    local i
    for ((i = 1; i <= NODES; i++)); do printf 'node%d\n' "$i"; done
}

installed() {
    local b
    for b in slurmctld slurmd sbatch squeue sinfo scancel sacct munged munge; do
        command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || return 1
    done
}

# sinfo --version would try to fetch a config; ask dpkg instead.
pkg_version() { dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo "?"; }

cmd_install() {
    need_root
    export PATH=$PATH:/usr/sbin:/sbin
    if installed; then
        log "already installed: slurm $(pkg_version)"
        return 0
    fi
    local t0
    t0=$(now)
    log "installing ${PACKAGES[*]} (apt-get, non-interactive)"
    export DEBIAN_FRONTEND=noninteractive
    # An update only when the package lists do not know the packages (fresh CI images).
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        apt-get update -q
    fi
    # policy-rc.d 101 keeps the packages' init scripts from starting daemons with the default
    # config; we start them ourselves with ours.
    local policy=/usr/sbin/policy-rc.d created_policy=""
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    local rc=0
    apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" || rc=$?
    [[ -n $created_policy ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get install failed (exit $rc)"
    installed || die "packages installed but the binaries are missing from PATH"
    log "installed in $(elapsed "$t0") s: slurm $(pkg_version)"
}

write_conf() {
    local host
    host=$(hostname -s)
    cat <<EOF
$MARKER; edits are overwritten by "scripts/slurm.sh start".
# Loopback-only test cluster: $NODES fake nodes, each a slurmd on 127.0.0.1 with its own port.
ClusterName=balsam
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No cgroups in containers: track processes by parentage, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Nodes may claim more CPUs than this host has; the config wins over what slurmd detects.
SlurmdParameters=config_overrides
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SchedulerType=sched/backfill
# Schedule at once instead of batching submissions: ~1 s from sbatch to running.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
# Finished jobs for "sacct -c" without slurmdbd.
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
# mpi4py over the mpich wheel needs PMI-2 from srun (with "none" the ranks start as separate
# 1-rank programs).
MpiDefault=pmi2
# Refuse at submission what no partition could ever run (e.g. more nodes than exist), as
# production sites do, rather than queueing it forever (PartitionConfig).
EnforcePartLimits=ALL
ReturnToService=2
# Short grace periods: cancellations and node loss show quickly in tests.
KillWait=5
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
# Everything off /run and /var/lib defaults, under one directory.
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmdSpoolDir=$STATE/spool/slurmd-%n
StateSaveLocation=$STATE/state
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
NodeName=node[1-$NODES] NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ctld_ok() { pid_alive "$STATE/run/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q 'is UP'; }

log_tail() {
    local f
    for f in "$STATE"/log/slurmctld.log "$STATE"/log/slurmd-*.log; do
        [[ -s $f ]] || continue
        printf -- '--- tail %s\n' "$f" >&2
        tail -n 15 "$f" >&2
    done
}

start_munge() {
    if munge_ok; then return 0; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    # A stale socket or pid file from a killed munged makes the new one refuse to start.
    if ! pid_alive "$MUNGE_PID"; then rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock "$MUNGE_PID"; fi
    runuser -u munge -- munged --force
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && return 0
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

stop_daemons() {
    local f pid pids=()
    for f in "$STATE"/run/slurmd-*.pid "$STATE"/run/slurmctld.pid; do
        if pid_alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$f"
    done
    local i
    for ((i = 0; i < 100; i++)); do
        local left=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
        [[ $left -eq 0 ]] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

nodes_idle() {
    # Every node answers and is usable: idle, or already busy with a job (mixed/allocated).
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [[ -n $states ]] || return 1
    ! grep -Evq ' (idle|mix|alloc)$' <<<"$states"
}

cmd_start() {
    need_root
    export PATH=$PATH:/usr/sbin:/sbin
    local t0
    t0=$(now)
    installed || cmd_install
    mkdir -p "$STATE"/{run,spool,state,log} /etc/slurm
    chmod 0755 "$STATE"
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away first"
    fi
    local new
    new=$(write_conf)
    if [[ ! -e $CONF ]] || [[ $(cat "$CONF") != "$new" ]]; then
        log "writing $CONF"
        # A changed config needs fresh daemons.
        stop_daemons
        printf '%s\n' "$new" >"$CONF"
    fi
    start_munge
    if ! pid_alive "$STATE/run/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld || {
            log_tail
            die "slurmctld failed to start"
        }
    fi
    local n
    for n in $(node_names); do
        if ! pid_alive "$STATE/run/slurmd-$n.pid"; then
            mkdir -p "$STATE/spool/slurmd-$n"
            log "starting slurmd -N $n"
            slurmd -N "$n" || {
                log_tail
                die "slurmd -N $n failed to start"
            }
        fi
    done
    local deadline resumed=""
    deadline=$(($(date +%s) + WAIT))
    until ctld_ok && nodes_idle; do
        if (($(date +%s) >= deadline)); then
            sinfo -N 2>&1 | sed 's/^/  /' >&2 || true
            log_tail
            die "nodes not idle after ${WAIT}s (sinfo above, log tails from $STATE/log)"
        fi
        # Nodes left down/drained by an earlier unclean stop come back on request.
        if [[ -z $resumed ]] && ctld_ok && sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(down|drain|drng)'; then
            scontrol update nodename="node[1-$NODES]" state=resume 2>/dev/null || true
            resumed=1
        fi
        sleep 0.2
    done
    log "up in $(elapsed "$t0") s: $(sinfo -h -o '%P %D %t' | tr '\n' ' ')"
}

cmd_stop() {
    need_root
    export PATH=$PATH:/usr/sbin:/sbin
    stop_daemons
    if pid_alive "$MUNGE_PID"; then
        kill "$(cat "$MUNGE_PID")" 2>/dev/null || true
    fi
    log "stopped"
}

cmd_status() {
    export PATH=$PATH:/usr/sbin:/sbin
    if ! command -v sinfo >/dev/null 2>&1; then
        echo "slurm not installed"
        return 1
    fi
    if ! ctld_ok; then
        echo "slurmctld not running (state dir $STATE)"
        return 1
    fi
    sinfo
    squeue
}

# Not root but passwordless sudo (CI runners): run this script under sudo.
if [[ ${1:-} =~ ^(install|start|stop)$ && $(id -u) -ne 0 ]] && command -v sudo >/dev/null 2>&1 &&
    sudo -n true 2>/dev/null; then
    exec sudo -n -E "$0" "$@"
fi

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
conf) write_conf ;;
*)
    echo "usage: $0 install|start|stop|status|conf" >&2
    exit 2
    ;;
esac
