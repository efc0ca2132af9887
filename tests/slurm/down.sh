#!/usr/bin/env bash
# tests/slurm/down.sh [--keep] DIR — stops the cluster tests/slurm/up.sh started in DIR and
# removes DIR (kept with --keep). Cancels its jobs while the controller runs, then ends by
# pid: the slurmd and slurmctld of DIR/pids, then munged, then any process left that belongs
# to this cluster (a job step's slurmstepd or task: DRAGON_SLURM_TEST=DIR in its environment,
# or SLURM_CONF=DIR/slurm.conf with SLURMD_NODENAME). SIGTERM, then SIGKILL after a bounded
# wait. Touches nothing else; running it twice is harmless.
set -u
keep=0
[ "${1:-}" = --keep ] && { keep=1; shift; }
[ $# -eq 1 ] || { echo "usage: down.sh [--keep] DIR" >&2; exit 2; }
[ -d "$1" ] || exit 0
DIR=$(cd "$1" && pwd)
[ -e "$DIR/.dragon-slurm-test" ] || { echo "slurm down: $DIR is not a test cluster" >&2; exit 2; }
ctld=$(cat "$DIR/pids/slurmctld.pid" 2>/dev/null)
if [ -n "$ctld" ] && kill -0 "$ctld" 2>/dev/null; then
  export SLURM_CONF="$DIR/slurm.conf"
  jobs=$(timeout 5 squeue -h -o %i 2>/dev/null)
  # shellcheck disable=SC2086
  [ -z "$jobs" ] || timeout 5 scancel $jobs 2>/dev/null
fi
python3 "$(dirname "$0")/stop.py" "$DIR"
rc=$?
[ $keep = 1 ] || rm -rf "$DIR"
exit $rc
