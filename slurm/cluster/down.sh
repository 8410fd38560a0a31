#!/usr/bin/env bash
# Stop the two-node test cluster started by up.sh (by PID, from its pid files).
#
#   bash slurm/cluster/down.sh           # stop daemons, keep state (job ids, accounting)
#   bash slurm/cluster/down.sh --purge   # ... and delete the state dir (job ids restart at 1)
#
# Idempotent: fine when nothing runs or the state dir does not exist.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

purge=0
for a in "$@"; do
    case $a in
        --purge) purge=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) die "unknown argument: $a (use --purge)" ;;
    esac
done

if [ ! -d "$S" ]; then
    echo "slurm cluster down: nothing to stop ($S does not exist)"
    exit 0
fi
exec 9>"$S/.lock"
flock -w 120 9 || die "another up.sh/down.sh holds $S/.lock"

# 1. Cancel remaining jobs while slurmctld still runs, so no job (and its
#    slurmstepd) outlives the cluster; KillWait=5 bounds how long this takes.
if daemon_pid slurmctld >/dev/null && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling $(wc -w <<<"$jobs") job(s)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        no_jobs() { [ -z "$(squeue -h -o %A 2>/dev/null)" ]; }
        wait_until 20 no_jobs || log "WARNING: jobs still listed after 20 s; stopping anyway"
    fi
fi

# stop_group NAME...: SIGTERM all, wait (zombies count as dead), SIGKILL after 30 s.
stop_group() {
    local d pid pids=() names=()
    for d in "$@"; do
        if pid=$(daemon_pid "$d"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid"); names+=("$d")
        fi
    done
    [ ${#pids[@]} -gt 0 ] || return 0
    all_dead() { local p; for p in "${pids[@]}"; do pid_alive "$p" && return 1; done; return 0; }
    if ! wait_until 30 all_dead; then
        log "WARNING: ${names[*]} ignored SIGTERM for 30 s; sending SIGKILL"
        for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        wait_until 10 all_dead || die "could not stop ${names[*]}"
    fi
    stopped+=("${names[@]}")
}

# 2. Reverse start order: nodes first, then controller, accounting, auth, DB.
stopped=()
stop_group slurmd.n1 slurmd.n2
stop_group slurmctld
stop_group slurmdbd
stop_group munged
stop_group mariadb

# 3. Safety net: slurmstepd processes of our nodes still alive (they carry the
#    DOGCLF_SLURM_DIR marker from the slurmd environment).
for p in /proc/[0-9]*; do
    comm=""; read -r comm < "$p/comm" 2>/dev/null || true
    [ "$comm" = slurmstepd ] || continue
    if tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qx "DOGCLF_SLURM_DIR=$S"; then
        log "killing leftover slurmstepd ${p#/proc/}"
        kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
done

for d in "${ALL_DAEMONS[@]}"; do
    read -r pidfile _ _ < <(daemon_info "$d")
    rm -f "$pidfile"
done

msg="stopped: ${stopped[*]:-nothing was running}"
if [ $purge = 1 ]; then
    # Guard against deleting something that is not our state dir.
    case $S in /|/tmp|/root|/home|"") die "refusing to purge $S" ;; esac
    [ -f "$S/etc/slurm.conf" ] || [ -f "$S/.lock" ] || die "refusing to purge $S: not a cluster state dir"
    exec 9>&-
    rm -rf "$S"
    msg+="; purged $S"
fi
echo "slurm cluster down: $msg"
