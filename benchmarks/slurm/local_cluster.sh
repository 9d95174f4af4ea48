#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the test suite and CI.
#
#   benchmarks/slurm/local_cluster.sh start    # install (apt) if needed, configure, start, wait for "idle"
#   benchmarks/slurm/local_cluster.sh stop     # stop slurmd, slurmctld and the munged this script started
#   benchmarks/slurm/local_cluster.sh status   # sinfo + squeue
#
# No systemd is needed: munged, slurmctld and slurmd are started directly (as root; the
# script re-runs itself through sudo when it is not root). `start` is idempotent: when the
# cluster already answers with its node idle it does nothing; when the generated slurm.conf
# changed it restarts the daemons.
#
# The node is this host (`hostname -s`, address 127.0.0.1). It declares at least
# VISIONZOO_SLURM_CPUS (default 4) CPUs even on smaller machines, and every core may be
# shared by VISIONZOO_SLURM_OVERSUBSCRIBE (default 2) jobs, so two jobs of
# `--ntasks-per-node 2` run side by side on a 2-core CI runner. There is no accounting
# (no slurmdbd): `sacct` does not work, use `squeue` / `scontrol show job`.
#
# A requeued job (`scontrol requeue`, Lightning's SIGUSR1 handler) may start again after
# VISIONZOO_SLURM_CRED_EXPIRE + 1 seconds (default 10; slurm's own default is 120).
#
# Environment: VISIONZOO_SLURM_CPUS, VISIONZOO_SLURM_OVERSUBSCRIBE, VISIONZOO_SLURM_CRED_EXPIRE,
# VISIONZOO_SLURM_TIMEOUT (seconds to wait for the node, default 60), VISIONZOO_SLURM_FORCE=1
# (replace a slurm.conf that this script did not write; the old one is kept as
# slurm.conf.bak.<time>). Logs: /var/log/slurm/{slurmctld,slurmd}.log, /var/log/munge/munged.log.
set -euo pipefail

MARKER="# Written by visionzoo benchmarks/slurm/local_cluster.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
MUNGE_LOG=/var/log/munge/munged.log
# munged is only stopped by `stop` when this script started it.
MUNGE_OURS="$MUNGE_RUN/started-by-visionzoo"
TIMEOUT="${VISIONZOO_SLURM_TIMEOUT:-60}"

log() { echo "[local_cluster] $*"; }
die() { echo "[local_cluster] ERROR: $*" >&2; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "must run as root (and sudo is not installed)"
    exec sudo -n -E bash "$0" "$@"
fi

# --------------------------------------------------------------------------- helpers
pid_alive() {  # pid_alive PIDFILE -> 0 when the process in PIDFILE runs
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: TERM, wait 10 s, then KILL
    local name=$1 pidfile=$2 pid i
    if ! pid_alive "$pidfile"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(cat "$pidfile")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop in 10 s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_answers() { timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; }
node_name() { hostname -s 2>/dev/null || uname -n | cut -d. -f1; }
node_state() { timeout 5 sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n1; }

show_logs() {
    local f
    for f in "$MUNGE_LOG" "$CTLD_LOG" "$SLURMD_LOG"; do
        [[ -f "$f" ]] || continue
        echo "----- tail -n 25 $f" >&2
        tail -n 25 "$f" >&2 || true
    done
}

# --------------------------------------------------------------------------- install
install_packages() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
    command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
    command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    command -v apt-get >/dev/null 2>&1 || die "slurm is not installed and apt-get is missing: install slurm-wlm and munge yourself"
    log "installing slurm-wlm and munge with apt-get (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
               install --no-install-recommends slurm-wlm munge)
    # Only refresh the package lists when the install cannot find the packages.
    if ! "${apt[@]}" >/tmp/visionzoo-slurm-apt.log 2>&1; then
        log "apt-get install failed, running apt-get update first"
        apt-get update -q >>/tmp/visionzoo-slurm-apt.log 2>&1 || { tail -n 20 /tmp/visionzoo-slurm-apt.log >&2; die "apt-get update failed"; }
        "${apt[@]}" >>/tmp/visionzoo-slurm-apt.log 2>&1 || { tail -n 30 /tmp/visionzoo-slurm-apt.log >&2; die "apt-get install slurm-wlm munge failed"; }
    fi
    command -v slurmctld >/dev/null 2>&1 || die "slurmctld still missing after apt-get install"
    log "installed: $(slurmctld -V 2>/dev/null || echo slurm)"
}

# --------------------------------------------------------------------------- munge
start_munge() {
    if [[ ! -s "$MUNGE_KEY" ]]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    # munged refuses keys and directories that others can read or write.
    chown "$user:" "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"

    if munge_works; then
        log "munged already running"
        return 0
    fi
    mkdir -p "$MUNGE_RUN" /var/lib/munge "$(dirname "$MUNGE_LOG")"
    chown "$user:" "$MUNGE_RUN" /var/lib/munge "$(dirname "$MUNGE_LOG")"
    chmod 0755 "$MUNGE_RUN"
    chmod 0700 /var/lib/munge "$(dirname "$MUNGE_LOG")"
    log "starting munged (as $user)"
    # --force: start even after an unclean stop left a socket behind.
    if [[ $user == root ]]; then
        munged --force
    else
        runuser -u munge -- munged --force
    fi
    touch "$MUNGE_OURS"
    local i
    for i in $(seq 1 50); do
        munge_works && { log "munged is up"; return 0; }
        sleep 0.2
    done
    show_logs
    die "munged does not answer (munge -n | unmunge)"
}

# --------------------------------------------------------------------------- config
write_config() {  # prints "changed" when slurm.conf was (re)written
    local host cpus mem min_cpus share cred_expire tmp
    host=$(node_name)
    cpus=$(nproc)
    min_cpus="${VISIONZOO_SLURM_CPUS:-4}"
    (( cpus < min_cpus )) && cpus=$min_cpus
    share="${VISIONZOO_SLURM_OVERSUBSCRIBE:-2}"
    cred_expire="${VISIONZOO_SLURM_CRED_EXPIRE:-10}"
    # 90 % of the memory, in MB: slurmd drains a node that reports less than RealMemory.
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    (( mem < 1 )) && mem=1

    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
    chmod 0755 "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
$MARKER -- do not edit, rerun it.
# One node, this host; daemons run as root without systemd, cgroups or accounting.
ClusterName=visionzoo
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s).
AuthInfo=cred_expire=$cred_expire
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Pending jobs (e.g. requeued ones once eligible) start within ~2 s instead of up to 60 s.
SchedulerParameters=bf_interval=2,sched_interval=2
# Nodes keep the resources declared here even when the machine has fewer (CI runners).
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
KillWait=5
Waittime=0
# Finished jobs stay visible to scontrol show job / squeue -t all for 10 minutes.
MinJobAge=600
MailProg=/bin/true
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$share
EOF
    if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 0
    fi
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        if [[ "${VISIONZOO_SLURM_FORCE:-0}" != 1 ]]; then
            rm -f "$tmp"
            die "$CONF exists and was not written by this script; set VISIONZOO_SLURM_FORCE=1 to replace it (a backup is kept)"
        fi
        cp -p "$CONF" "$CONF.bak.$(date +%s)"
    fi
    install -m 0644 "$tmp" "$CONF"
    rm -f "$tmp"
    echo changed
}

# --------------------------------------------------------------------------- commands
wait_idle() {
    local host state deadline
    host=$(node_name)
    deadline=$((SECONDS + TIMEOUT))
    while (( SECONDS < deadline )); do
        state=$(node_state || true)
        case "$state" in
            idle|mixed|allocated|completing) log "node $host is $state"; return 0 ;;
            down*|drain*|drained*|fail*)
                log "node $host is $state, resuming it"
                scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    show_logs
    echo "----- sinfo" >&2
    sinfo -N -l 2>&1 >&2 || true
    die "node $host did not become idle within ${TIMEOUT}s (state: '${state:-no answer}')"
}

cmd_start() {
    local t0=$SECONDS changed
    install_packages
    start_munge
    changed=$(write_config)
    if [[ -n $changed ]]; then
        log "wrote $CONF"
        if pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; then
            log "configuration changed: restarting the slurm daemons"
            stop_pidfile slurmd "$SLURMD_PID"
            stop_pidfile slurmctld "$CTLD_PID"
        fi
    else
        log "$CONF is up to date"
    fi

    if ctld_answers; then
        log "slurmctld already running"
    else
        pid_alive "$CTLD_PID" && stop_pidfile slurmctld "$CTLD_PID"  # hung
        log "starting slurmctld"
        slurmctld || { show_logs; die "slurmctld failed to start"; }
        local i
        for i in $(seq 1 "$((TIMEOUT * 2))"); do
            ctld_answers && break
            pid_alive "$CTLD_PID" || { sleep 0.5; pid_alive "$CTLD_PID" || { show_logs; die "slurmctld exited"; }; }
            sleep 0.5
        done
        ctld_answers || { show_logs; die "slurmctld does not answer scontrol ping"; }
    fi

    if pid_alive "$SLURMD_PID"; then
        log "slurmd already running"
    else
        log "starting slurmd"
        slurmd -N "$(node_name)" || { show_logs; die "slurmd failed to start"; }
    fi

    wait_idle
    log "cluster ready in $((SECONDS - t0)) s:"
    sinfo
}

cmd_stop() {
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    if [[ -f "$MUNGE_OURS" ]]; then
        stop_pidfile munged "$MUNGE_PID"
        rm -f "$MUNGE_OURS"
    fi
    log "stopped"
}

cmd_status() {
    if ! timeout 5 sinfo 2>&1; then
        log "slurmctld does not answer (sinfo failed or took over 5 s)"
        return 1
    fi
    squeue
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
