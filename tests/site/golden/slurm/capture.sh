#!/usr/bin/env bash
# How the files in this folder were captured: against the loopback Slurm of
# scripts/slurm.sh (Slurm 22.05, 4 fake nodes), with the exact argv the adapter renders.
# sbatch_too_many_nodes: rejected at submission because slurm.conf has EnforcePartLimits=ALL.
# Re-run: scripts/slurm.sh start && tests/site/golden/slurm/capture.sh (takes ~80 s: one job
# must hit its 1-minute wall time).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
cd "$work"
fmt='%i|%T|%P|%D|%l|%V|%S|%e|%r'
sacct_fields=JobID,State,Partition,NNodes,Timelimit,Submit,Start,End,ExitCode
sub() { sbatch --parsable --chdir="$work" "$@"; }

printf '#!/bin/bash\nsleep "$1"\nexit "${2:-0}"\n' >job.sh
chmod +x job.sh
sub --nodes=1 --time=5 --job-name=ok job.sh 1 >"$here/sbatch_ok.out"
ok=$(cat "$here/sbatch_ok.out")
failed=$(sub --nodes=1 --time=5 --job-name=fails job.sh 1 3)
timeout_id=$(sub --nodes=1 --time=1 --job-name=timeout job.sh 300)
cancelled=$(sub --nodes=1 --time=5 --job-name=cancelled job.sh 300)
running=$(sub --nodes=2 --time=10 --job-name=running job.sh 300)
pending=$(sub --nodes=4 --time=5 --job-name=pending job.sh 1)
held=$(sub --nodes=1 --time=5 --hold --job-name=held job.sh 1)
sbatch --parsable --partition=nosuchpartition --nodes=1 --time=5 job.sh 1 >"$here/sbatch_bad_partition.out" 2>"$here/sbatch_bad_partition.err" || echo $? >"$here/sbatch_bad_partition.rc"
sbatch --parsable --nodes=99 --time=5 job.sh 1 >"$here/sbatch_too_many_nodes.out" 2>"$here/sbatch_too_many_nodes.err" || echo $? >"$here/sbatch_too_many_nodes.rc"
sleep 3
scancel "$cancelled"
# Wait for the wall-time kill of $timeout_id (1 min + KillWait).
for _ in $(seq 120); do
    st=$(squeue -h --states=all -j "$timeout_id" -o %T)
    [[ $st == TIMEOUT ]] && break
    sleep 1
done
ids="$ok,$failed,$timeout_id,$cancelled,$running,$pending,$held"
echo "$ids" >"$here/ids.txt"
squeue --noheader --states=all --format="$fmt" --jobs="$ids" >"$here/squeue_states.out"
sinfo --noheader --format='%R|%a|%l|%D|%t' >"$here/sinfo_busy.out"
sacct --completion --noheader --parsable2 --format=$sacct_fields --jobs="$ids" >"$here/sacct_completion.out"
sacct --allocations --noheader --parsable2 --format=$sacct_fields --jobs="$ids" >"$here/sacct_disabled.out" 2>"$here/sacct_disabled.err" || echo $? >"$here/sacct_disabled.rc"
squeue --noheader --states=all --format="$fmt" --jobs=999999 >"$here/squeue_unknown.out" 2>"$here/squeue_unknown.err" || echo $? >"$here/squeue_unknown.rc"
# scancel of an unknown id is silent with exit 0; with -v it says why.
scancel 999999 2>"$here/scancel_unknown.err" || echo $? >"$here/scancel_unknown.rc"
scancel -v 999999 2>"$here/scancel_unknown_verbose.err" || echo $? >"$here/scancel_unknown_verbose.rc"
scancel "$running" "$pending" "$held"
sleep 2
sinfo --noheader --format='%R|%a|%l|%D|%t' >"$here/sinfo_idle.out"
rm -rf "$work"
echo "captured into $here"
