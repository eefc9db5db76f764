#!/usr/bin/env bash
# Captures for find_by_name (a pilot looked up by its scheduler job name after a crash
# between sbatch and the site journal), against the loopback Slurm of scripts/slurm.sh, with
# the exact argv the adapter renders (slurm.render_find_argv / render_sacct_find_argv).
# Jobs: A and C and D are all named balsam-golden-7 (A ended, C running, D held: a
# duplicate, as left by an old daemon); B is balsam-golden-70 (a prefix look-alike).
# Note: sacct --completion (jobcomp/filetxt) ignores --name/--user/--starttime and lists
# every job it has; the adapter's parser keeps exact name matches.
# Re-run: scripts/slurm.sh start && tests/site/golden/slurm/capture_find.sh (~10 s).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
cd "$work"
user=$(id -un)
fmt='%i|%T|%P|%D|%l|%V|%S|%e|%r|%j'
fields=JobID,State,Partition,NNodes,Timelimit,Submit,Start,End,ExitCode,JobName
sub() { sbatch --parsable --chdir="$work" "$@"; }

printf '#!/bin/bash\nsleep "$1"\n' >job.sh
chmod +x job.sh
a=$(sub --nodes=1 --time=5 --job-name=balsam-golden-7 job.sh 1)
b=$(sub --nodes=1 --time=5 --job-name=balsam-golden-70 job.sh 1)
sleep 4
c=$(sub --nodes=2 --time=5 --job-name=balsam-golden-7 job.sh 300)
d=$(sub --nodes=1 --time=5 --hold --job-name=balsam-golden-7 job.sh 1)
sleep 2
echo "$a,$b,$c,$d" >"$here/find_ids.txt"
squeue --noheader --states=all --format="$fmt" --name=balsam-golden-7 --user="$user" >"$here/squeue_by_name.out"
squeue --noheader --states=all --format="$fmt" --name=balsam-golden-nosuch --user="$user" >"$here/squeue_by_name_none.out"
sacct --completion --noheader --parsable2 --format=$fields --name=balsam-golden-7 --user="$user" \
    --starttime="$(date -d '-1 hour' +%Y-%m-%dT%H:%M:%S)" >"$here/sacct_completion_by_name.out"
sacct --allocations --noheader --parsable2 --format=$fields --name=balsam-golden-7 --user="$user" \
    >"$here/sacct_by_name_disabled.out" 2>"$here/sacct_by_name_disabled.err" || echo $? >"$here/sacct_by_name_disabled.rc"
scancel "$c" "$d"
rm -rf "$work"
echo "captured into $here"
