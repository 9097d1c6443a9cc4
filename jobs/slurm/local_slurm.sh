#!/usr/bin/env bash
# A one-node SLURM on this machine, for tests and trying the batch scripts (not for production).
#
#   bash jobs/slurm/local_slurm.sh          install if missing (apt-get), start, wait until idle
#   bash jobs/slurm/local_slurm.sh stop     cancel every job, stop the daemons it started and
#                                           remove its /etc/slurm/slurm.conf link
#
# Everything it writes lives under PIADM_SLURM_DIR (default /tmp/piadm-slurm): slurm.conf,
# state, spool, pid and log files; /etc/slurm/slurm.conf is a link to that slurm.conf (made only
# where no other slurm.conf exists), so sbatch, squeue and srun find it without SLURM_CONF.
# Idempotent: when the node already answers, it returns at once. Where it cannot run (not
# root, no apt-get, a site's own slurm.conf) it prints one line and exits 0 without starting
# anything, so CI elsewhere still runs the test suite, whose SLURM tests then skip.
# The settings: munge authentication, root as
# SlurmUser, no cgroups or accounting, a 2 s scheduler, cred_expire=5 so that a requeued job
# restarts after about 5 s.
set -euo pipefail
base="${PIADM_SLURM_DIR:-/tmp/piadm-slurm}"
conf="$base/slurm.conf"
etc_conf=/etc/slurm/slurm.conf
node="$(uname -n)"
node="${node%%.*}"

say() { echo "local_slurm: $*"; }

node_state() {  # the node's state as sinfo reports it; empty when no controller answers
    command -v scontrol >/dev/null || return 0
    timeout 5 scontrol ping >/dev/null 2>&1 || return 0  # answers at once, unlike sinfo
    timeout 10 sinfo -h -N -o %T 2>/dev/null | head -n 1 || true
}

running() {  # is the process in pid file $1 alive?
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop() {
    if command -v squeue >/dev/null && [ -n "$(node_state)" ]; then
        jobs="$(squeue -h -o %A 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel --full $jobs || true
            for _ in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    for pidfile in "$base/slurmd.pid" "$base/slurmctld.pid" "$base/munged.pid"; do
        running "$pidfile" || continue
        pid="$(cat "$pidfile")"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        say "stopped $(basename "$pidfile" .pid) (pid $pid)"
    done
    rm -f "$base/munged.pid"
    # the system-wide link into this folder goes too (only ours: a site's own file is kept)
    if [ -L "$etc_conf" ] && [ "$(readlink "$etc_conf")" = "$conf" ]; then
        rm -f "$etc_conf"
        say "removed the link $etc_conf"
    fi
}

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local pkgs=(slurmctld slurmd slurm-client munge)
    say "installing ${pkgs[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$base/apt.log" 2>&1 ||
        { apt-get update -q >>"$base/apt.log" 2>&1 &&
          apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$base/apt.log" 2>&1; }
}

start_munge() {
    if echo | timeout 5 munge 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving (ours or the machine's)
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create 2>/dev/null || create-munge-key
        chown munge:munge /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$base/munged.pid"  # we started it, so `stop` stops it
}

# The cores this machine gives us: nproc alone answers OMP_NUM_THREADS where it is set (1 on
# many clusters and in piadm's own runs), which made a one-CPU node that skips the SLURM tests
cores() {
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
}

write_conf() {
    local cpus mem
    cpus="$(cores)"
    mem="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    mkdir -p "$base/state" "$base/spool"
    cat >"$conf" <<EOF
# Written by jobs/slurm/local_slurm.sh: a one-node SLURM for tests.
ClusterName=piadm
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
SchedulerParameters=bf_interval=1,sched_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
MailProg=/bin/true
StateSaveLocation=$base/state
SlurmdSpoolDir=$base/spool
SlurmctldPidFile=$base/slurmctld.pid
SlurmdPidFile=$base/slurmd.pid
SlurmctldLogFile=$base/slurmctld.log
SlurmdLogFile=$base/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p /etc/slurm
    ln -sfn "$conf" "$etc_conf"
}

start() {
    local state
    state="$(node_state)"
    case "$state" in
        idle*|mixed*|allocated*|completing*) say "already up: node $node is $state"; return 0 ;;
    esac
    if [ "$(id -u)" -ne 0 ]; then
        say "not root: not starting a local SLURM (the SLURM tests will skip)"
        return 0
    fi
    if [ -e "$etc_conf" ] && [ "$(readlink "$etc_conf" || true)" != "$conf" ]; then
        say "$etc_conf belongs to another SLURM set-up: leaving it alone" \
            "(the SLURM tests will skip)"
        return 0
    fi
    if ! command -v sbatch >/dev/null && ! command -v apt-get >/dev/null; then
        say "no SLURM and no apt-get to install it: not starting one" \
            "(the SLURM tests will skip)"
        return 0
    fi
    mkdir -p "$base"
    if ! install_packages; then
        say "apt-get install failed (see $base/apt.log): not starting one"
        return 0
    fi
    start_munge
    if ! running "$base/slurmctld.pid" || ! running "$base/slurmd.pid"; then
        write_conf
        running "$base/slurmctld.pid" || /usr/sbin/slurmctld -c
        running "$base/slurmd.pid" || /usr/sbin/slurmd
    fi
    for _ in $(seq 120); do
        state="$(node_state)"
        case "$state" in
            idle*|mixed*|allocated*|completing*)
                say "up: node $node is $state ($(cores) CPUs; config, state and logs in $base)"
                return 0 ;;
            down*|drain*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    say "the node did not become idle within 60 s (state '${state:-no answer}'); see $base/*.log"
    return 1
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
