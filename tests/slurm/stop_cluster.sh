#!/usr/bin/env bash
# Stops the daemons tests/slurm/start_cluster.sh DIR started, by the PIDs it wrote to DIR/pids
# (slurmd, slurmctld, munged: the reverse of their start), waiting up to 10 s for each to exit.
set -uo pipefail

dir=${1:?usage: stop_cluster.sh DIR}
[ -f "$dir/pids" ] || exit 0
for pid in $(tac "$dir/pids"); do
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
done
: > "$dir/pids"
