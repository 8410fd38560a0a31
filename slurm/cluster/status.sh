#!/usr/bin/env bash
# Show which daemons of the test cluster are alive, and sinfo.
# Exit status 0 when all six daemons run, 1 otherwise.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

echo "state dir: $S"
rc=0
for d in "${ALL_DAEMONS[@]}"; do
    if pid=$(daemon_pid "$d"); then
        printf '  %-11s alive  pid %s\n' "$d" "$pid"
    else
        printf '  %-11s DEAD\n' "$d"; rc=1
    fi
done
if daemon_pid slurmctld >/dev/null; then
    sinfo -N -o '%10N %10P %8t %5c %10m %12G %E' || rc=1
    echo "jobs in queue: $(squeue -h 2>/dev/null | wc -l)"
fi
[ $rc = 0 ] && echo "env: source $S/env.sh"
exit $rc
