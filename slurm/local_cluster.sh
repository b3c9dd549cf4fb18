#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for the tests and for trying slurm/train.sh and
# launch/submit.py without a cluster.
#
#   bash slurm/local_cluster.sh up       # install (Debian: slurmctld slurmd slurm-client munge) if missing, start, wait idle
#   bash slurm/local_cluster.sh status   # daemons and `sinfo`
#   bash slurm/local_cluster.sh down     # cancel all jobs, stop every daemon it started; nothing is left running
#
# Needs root (it installs packages, writes /etc/slurm/slurm.conf and /etc/hosts entries, runs the daemons).
# Layout: munged, slurmctld and two `slurmd -N node1|node2` (NodeAddr=127.0.0.1, each on its own port), CPU-only,
# one partition `debug` (default), no accounting, batch jobs requeueable. Every call is idempotent.
# State, spool and logs live under $RESTORE_SLURM_STATE (default /var/lib/restore-slurm); logs in its log/.
# An existing /etc/slurm/slurm.conf that this script did not write is never overwritten (a real cluster's).
set -euo pipefail

STATE=${RESTORE_SLURM_STATE:-/var/lib/restore-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by restore slurm/local_cluster.sh"
NODES=(node1 node2)
CPUS_PER_NODE=${RESTORE_SLURM_CPUS:-2}   # each node claims this many CPUs (both share the host's cores)
CTLD_PORT=${RESTORE_SLURM_CTLD_PORT:-6817}
SLURMD_PORT0=${RESTORE_SLURM_SLURMD_PORT:-6821}   # node k listens on SLURMD_PORT0 + k - 1
MAX_TIME_MIN=60
WAIT_S=${RESTORE_SLURM_WAIT_S:-90}
CONF_CHANGED=0

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root (installs packages and starts daemons)"; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    # The packages' postinst would try to start the daemons with the distro config; keep them from it.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    ((own_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install ${missing[*]} failed (rc=$rc)"
}

write_hosts() {
    local n
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >>/etc/hosts
    done
}

write_munge_key() {
    install -d -o munge -g munge -m 0700 /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to replace a real cluster's config"
    fi
    mkdir -p /etc/slurm "$STATE"/{ctld,log,spool}
    local host tmp k
    host=$(hostname -s)
    tmp=$(mktemp "$CONF.XXXXXX")
    {
        echo "$MARK"
        cat <<EOF
ClusterName=restore-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire+1 s before they may start again (default 120): keep tests quick.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups on these machines: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending (e.g. requeued) jobs every few seconds rather than every minute.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that went down comes back by itself; batch jobs may be requeued (preemption, scontrol requeue).
ReturnToService=2
JobRequeue=1
# Time between SIGTERM and SIGKILL when a job is cancelled/requeued: the job checkpoints in it.
KillWait=30
InactiveLimit=0
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
SlurmctldDebug=info
SlurmdDebug=info
EOF
        for k in "${!NODES[@]}"; do
            echo "NodeName=${NODES[k]} NodeAddr=127.0.0.1 NodeHostname=${NODES[k]} Port=$((SLURMD_PORT0 + k)) CPUs=$CPUS_PER_NODE RealMemory=2048 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=$MAX_TIME_MIN State=UP OverSubscribe=NO"
    } >"$tmp"
    chmod 0644 "$tmp"
    if cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; else mv -f "$tmp" "$CONF"; CONF_CHANGED=1; fi
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_daemons() {
    if ! munge_ok; then
        log "starting munged"
        runuser -u munge -- munged 2>>"$STATE/log/munged.log" || die "munged failed; see $STATE/log/munged.log"
        touch "$STATE/munged.ours"   # `down` stops only a munged that `up` started
        for _ in $(seq 50); do munge_ok && break; sleep 0.2; done
        munge_ok || die "munged does not answer; see $STATE/log/munged.log"
    fi
    if ((CONF_CHANGED)); then
        # Some settings (ports, cred_expire) are read only at start: restart rather than reconfigure.
        # Running jobs survive (state is saved, slurmstepd lives on).
        stop_slurm_daemons
    fi
    if ! pid_alive "$STATE/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld -f "$CONF" || die "slurmctld failed; see $STATE/log/slurmctld.log"
    fi
    local n
    for n in "${NODES[@]}"; do
        if ! pid_alive "$STATE/slurmd-$n.pid"; then
            log "starting slurmd -N $n"
            mkdir -p "$STATE/spool/$n"
            slurmd -f "$CONF" -N "$n" || die "slurmd -N $n failed; see $STATE/log/slurmd-$n.log"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) states
    while ((SECONDS < deadline)); do
        states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u || true)
        # Ready when every node answers (idle, or busy with a job left from before).
        if [[ $(grep -cE ' (idle|mix|alloc)$' <<<"$states") == "${#NODES[@]}" ]]; then
            log "up: $(tr '\n' ' ' <<<"$states")"
            return 0
        fi
        # A node that came back after a restart stays down until told otherwise.
        if grep -qE ' (down|drain|drng|fail)\*?$' <<<"$states"; then
            scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
        fi
        sleep 1
    done
    log "nodes not idle after ${WAIT_S}s: $(tr '\n' ' ' <<<"$states")"
    tail -n 20 "$STATE"/log/*.log >&2 || true
    return 1
}

up() {
    need_root
    install_packages
    write_hosts
    write_munge_key
    write_conf
    start_daemons
    wait_idle
}

stop_pidfile() {   # stop_pidfile NAME PIDFILE: TERM, wait, then KILL
    local name=$1 f=$2 pid
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name ($pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop_slurm_daemons() {
    local n
    for n in "${NODES[@]}"; do stop_pidfile "slurmd $n" "$STATE/slurmd-$n.pid"; done
    stop_pidfile slurmctld "$STATE/slurmctld.pid"
}

down() {
    need_root
    if [[ -e $CONF ]] && grep -qF "$MARK" "$CONF" && pid_alive "$STATE/slurmctld.pid"; then
        # Jobs first, so that no slurmstepd or training process outlives the cluster.
        if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
            log "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
            # shellcheck disable=SC2046  # one argument per job id
            scancel --full $(squeue -h -o %i) 2>/dev/null || true
            for _ in $(seq 60); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 1; done
        fi
    fi
    stop_slurm_daemons
    # Steps whose slurmd is gone (a crash, a timeout above) would run on: none may outlive `down`.
    local left
    left=$(pgrep -x slurmstepd 2>/dev/null || true)
    if [[ -n $left && -e $CONF ]] && grep -qF "$MARK" "$CONF"; then
        log "killing leftover slurmstepd: $(echo $left)"
        kill -KILL $left 2>/dev/null || true
    fi
    if [[ -e $STATE/munged.ours ]]; then
        log "stopping munged"
        munged --stop >/dev/null 2>&1 || true
        rm -f "$STATE/munged.ours"
    fi
    log "down"
}

status() {
    local n rc=0
    if munge_ok; then echo "munged: running"; else echo "munged: stopped"; rc=3; fi
    if pid_alive "$STATE/slurmctld.pid"; then echo "slurmctld: running ($(cat "$STATE/slurmctld.pid"))"; else echo "slurmctld: stopped"; rc=3; fi
    for n in "${NODES[@]}"; do
        if pid_alive "$STATE/slurmd-$n.pid"; then echo "slurmd $n: running ($(cat "$STATE/slurmd-$n.pid"))"; else echo "slurmd $n: stopped"; rc=3; fi
    done
    if ((rc == 0)); then sinfo -N -l || rc=3; squeue || true; fi
    return $rc
}

case ${1:-} in
up) up ;;
down) down ;;
status) status ;;
*) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
