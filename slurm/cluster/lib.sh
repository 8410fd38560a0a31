# Shared helpers for up.sh / down.sh / status.sh. Sourced, not executed.
# shellcheck shell=bash

# ---- layout (everything lives under one state dir) -------------------------
S="${DOGCLF_SLURM_DIR:-/tmp/dogclf-slurm}"
ETC="$S/etc"            # slurm.conf, gres.conf, slurmdbd.conf, my.cnf, hosts.nodes
RUN="$S/run"            # pid files of the root daemons (slurmctld, slurmdbd, slurmd.n1/n2)
LOGS="$S/logs"          # slurm daemon logs
MUNGE_DIR="$S/munge"    # owned by munge: key, seed, socket, pid, log
DB_DIR="$S/mariadb"     # owned by mysql: data/, socket, pid, log

NODES=(n1 n2)
SLURM_CONF_FILE="$ETC/slurm.conf"
MUNGE_SOCK="$MUNGE_DIR/munge.socket"
DB_SOCK="$DB_DIR/mysqld.sock"

# Ports (override via env if they clash with something on the host).
CTLD_PORT="${DOGCLF_SLURM_CTLD_PORT:-6817}"
DBD_PORT="${DOGCLF_SLURM_DBD_PORT:-6819}"
DB_PORT="${DOGCLF_SLURM_DB_PORT:-3307}"
NODE_PORT_BASE="${DOGCLF_SLURM_NODE_PORT_BASE:-17000}"   # n1 -> 17001, n2 -> 17002

# Clean environment for the daemons: they must not inherit whatever the caller
# had exported (CUDA_VISIBLE_DEVICES, SLURM_* of an enclosing job, ...).
# DOGCLF_SLURM_DIR doubles as a marker to find our leftover slurmstepd processes.
DAEMON_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
            SLURM_CONF="$SLURM_CONF_FILE" DOGCLF_SLURM_DIR="$S")

export SLURM_CONF="$SLURM_CONF_FILE"

log() { printf '[slurm-cluster] %s\n' "$*" >&2; }

# die MESSAGE [LOGFILE...]: one-line error, then the tail of the relevant logs.
die() {
    local msg=$1; shift
    printf 'slurm-cluster: ERROR: %s\n' "$msg" >&2
    local f
    for f in "$@"; do
        [ -r "$f" ] || continue
        printf -- '--- tail of %s ---\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
    exit 1
}

# name -> "pidfile comm logfile"
daemon_info() {
    case $1 in
        mariadb)   echo "$DB_DIR/mysqld.pid mariadbd $DB_DIR/mysqld.log" ;;
        munged)    echo "$MUNGE_DIR/munged.pid munged $MUNGE_DIR/munged.log" ;;
        slurmdbd)  echo "$RUN/slurmdbd.pid slurmdbd $LOGS/slurmdbd.log" ;;
        slurmctld) echo "$RUN/slurmctld.pid slurmctld $LOGS/slurmctld.log" ;;
        slurmd.*)  echo "$RUN/$1.pid slurmd $LOGS/$1.log" ;;
        *) return 1 ;;
    esac
}
ALL_DAEMONS=(mariadb munged slurmdbd slurmctld slurmd.n1 slurmd.n2)

# pid_alive PID [COMM]: running, not a zombie (orphans linger in state Z for a
# second or two after a stop), and - if given - the expected executable name,
# so a recycled PID from a stale pid file is not mistaken for our daemon.
pid_alive() {
    local pid=$1 comm=${2:-} stat state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }; state=${state%% *}
    [ "$state" != Z ] && [ "$state" != X ] || return 1
    [ -z "$comm" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

# daemon_pid NAME: prints the PID if the daemon is alive, else fails.
daemon_pid() {
    local pidfile comm logf pid
    read -r pidfile comm logf < <(daemon_info "$1")
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    pid=${pid//[^0-9]/}
    pid_alive "$pid" "$comm" || return 1
    echo "$pid"
}

# port_in_use PORT: something already accepts connections on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# need_port PORT ENVVAR: die early with a clear message instead of a bind error.
need_port() {
    ! port_in_use "$1" || die "127.0.0.1:$1 is already in use by another process (set $2 to another port, or stop that process)"
}

# wait_for TIMEOUT_S WHO CMD...: like wait_until, but gives up at once when
# the daemon WHO (a daemon name, or pid:N) has died - after a 3 s grace for a
# daemonizing process to write its pid file - instead of waiting out TIMEOUT_S.
wait_for() {
    local now; now=$(date +%s)
    local deadline=$(( now + $1 )) grace=$(( now + 3 )) who=$2; shift 2
    until "$@" >/dev/null 2>&1; do
        now=$(date +%s)
        [ "$now" -lt "$deadline" ] || return 1
        if [[ $who == pid:* ]]; then
            pid_alive "${who#pid:}" || return 1
        elif [ "$now" -ge "$grace" ] && ! daemon_pid "$who" >/dev/null; then
            return 1
        fi
        sleep 0.2
    done
}

# wait_until TIMEOUT_S CMD...: poll CMD every 0.2 s.
wait_until() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}
