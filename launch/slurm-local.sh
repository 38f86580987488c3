#!/usr/bin/env bash
# A single-node SLURM on this machine, for trying launch/slurm.sbatch and for tests/test_slurm.py.
#
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client   # Debian 12: 22.05
#   launch/slurm-local.sh start          # as root; prints the SLURM_CONF line to export
#   eval "$(launch/slurm-local.sh env)"  # sbatch, squeue, scontrol ... now talk to it
#   launch/slurm-local.sh stop           # cancels its jobs, stops the daemons, removes the state
#
# Everything lives in $DPVIT_SLURM_DIR (default /tmp/dpvit-slurm): slurm.conf, state, spool,
# logs and pid files; /etc/slurm is not touched, so the client commands need SLURM_CONF.
# slurmctld and slurmd run in the background as root, without systemd (fresh CI containers
# have none). Authentication is auth/none, which needs no munged and no key: fine for one node
# where only root submits, never for a shared machine. `start` and `stop` are idempotent.
# Ports: $DPVIT_SLURM_PORT (slurmctld, default 6817) and the next one (slurmd).
set -euo pipefail

dir="${DPVIT_SLURM_DIR:-/tmp/dpvit-slurm}"
port="${DPVIT_SLURM_PORT:-6817}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

die() { echo "slurm-local: $*" >&2; exit 1; }

running() {  # running PID: a slurmctld or slurmd, not a zombie (init may reap them late)
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" && [[ "$stat" =~ ^[0-9]+\ \(slurm(ctld|d)\)\ [^Z] ]]
}

alive() {  # alive PIDFILE: the daemon it names is running
    [[ -s "$1" ]] && running "$(<"$1")"
}

node_state() {  # the state sinfo gives this node ("idle", "down*", ...), empty if none
    sinfo --noheader --nodes="$node" --format=%t 2>/dev/null | head -n 1 || true
}

write_conf() {
    # slurmd -C prints this machine's CPUs, sockets, cores, threads and RealMemory (MB)
    local hw
    hw="$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')"
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$conf" <<EOF
# written by launch/slurm-local.sh; removed by its stop
ClusterName=dpvit-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
# no cgroups (containers seldom delegate them): processes are tracked by parentage
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/builtin
# look at pending jobs every second (default 60 s), so that a requeued job starts soon
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# scontrol requeue / scancel / preemption: SIGCONT + SIGTERM to every process of the job, then
# SIGKILL after KillWait seconds; dpvit needs well under a second to write its checkpoint
KillWait=30
JobRequeue=1
MinJobAge=60
# a requeued job may start again after cred_expire + 1 seconds (the default is 120 s)
AuthInfo=cred_expire=5
MailProg=/bin/true
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=local Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [[ "$(id -u)" == 0 ]] || die "start must run as root (slurmd runs jobs as their user)"
    local tool
    for tool in slurmctld slurmd sinfo scontrol; do
        command -v "$tool" >/dev/null || die "$tool not found; apt-get install -y" \
            "--no-install-recommends slurmctld slurmd slurm-client"
    done
    if ! alive "$dir/slurmctld.pid" || ! alive "$dir/slurmd.pid"; then
        stop_daemons
        write_conf
        # both fork to the background once set up; -i: ignore state of an earlier cluster
        slurmctld -f "$conf" -i || failed "slurmctld exited with $?"
        slurmd -f "$conf" || failed "slurmd exited with $?"
    fi
    local deadline=$((SECONDS + 60)) state=""
    while ((SECONDS < deadline)); do
        state="$(node_state)"
        case "$state" in
            idle | mix | alloc) break ;;
            down* | drain* | fail*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
        esac
        alive "$dir/slurmctld.pid" || failed "slurmctld is not running"
        alive "$dir/slurmd.pid" || failed "slurmd is not running"
        sleep 0.5
    done
    case "$state" in
        idle | mix | alloc) ;;
        *) failed "node $node is not up after 60 s (sinfo says: '${state}')" ;;
    esac
    echo "slurm-local: node $node is $state; run: export SLURM_CONF=$conf"
}

failed() {  # the cluster did not come up: show why, stop what did start, keep the logs
    local log
    for log in "$dir"/slurmctld.log "$dir"/slurmd.log; do
        [[ -f "$log" ]] && { echo "--- $log"; tail -n 15 "$log"; } >&2
    done
    stop_daemons
    die "$1; logs in $dir (remove it with: $0 stop)"
}

stop_daemons() {
    local name pid deadline
    for name in slurmd slurmctld; do
        alive "$dir/$name.pid" || continue
        pid="$(<"$dir/$name.pid")"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 15))
        while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        if running "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
}

stop() {
    if alive "$dir/slurmctld.pid"; then
        # kill every job (SIGKILL: no KillWait) so that no slurmstepd outlives the daemons
        local jobs deadline=$((SECONDS + 20))
        jobs="$(squeue --noheader --format=%A 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            scancel --signal=KILL --full $jobs 2>/dev/null || true
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            while [[ -n "$(squeue --noheader --format=%A 2>/dev/null || true)" ]] \
                    && ((SECONDS < deadline)); do
                sleep 0.5
            done
        fi
    fi
    stop_daemons
    rm -rf "$dir"
}

node="$(uname -n)"
node="${node%%.*}"  # the short host name, as slurmd finds its NodeName
case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$conf" ;;
    status)
        if alive "$dir/slurmctld.pid" && alive "$dir/slurmd.pid"; then
            echo "up: node $node $(node_state)"
        else
            echo down
            exit 1
        fi ;;
    *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
