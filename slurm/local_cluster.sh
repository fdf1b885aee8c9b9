#!/usr/bin/env bash
# A real single-node Slurm cluster (munged + slurmctld + slurmd) on this machine, for tests
# and local development of sbatch / submitit launches.
#
#   slurm/local_cluster.sh install            # apt-get install slurm-wlm munge iproute2 (root, Debian/Ubuntu)
#   slurm/local_cluster.sh start [STATE_DIR]  # start, wait for the node to be idle, print the export lines
#   slurm/local_cluster.sh start --nodes 2 [STATE_DIR]
#                                             # two slurmd "nodes", each in its own network and UTS
#                                             # namespace (see "Several nodes" below)
#   slurm/local_cluster.sh status [STATE_DIR] # sinfo, or "not running" (exit status 1)
#   slurm/local_cluster.sh env [STATE_DIR]    # print: export SLURM_CONF=STATE_DIR/slurm.conf
#                                             #        export PATH=STATE_DIR/bin:$PATH (sacct stand-in)
#   slurm/local_cluster.sh stop [STATE_DIR]   # cancel jobs, stop the daemons by their recorded PIDs
#   eval "$(slurm/local_cluster.sh env)"      # then sbatch/squeue/scontrol/submitit use this cluster
#
# STATE_DIR defaults to $POA_SLURM_DIR or /tmp/poa-slurm. Everything (munge key and socket, slurm.conf,
# spool, state, logs, pid files) lives in it, so several clusters can run side by side when they use
# different ports: POA_SLURM_CTLD_PORT (default 6917) and POA_SLURM_D_PORT (default 6918).
# POA_SLURM_CPUS=N announces N CPUs instead of the real count; POA_SLURM_START_TIMEOUT (60 s) bounds
# the wait for the node to become idle.
# Client commands (sbatch, srun, squeue, scontrol, scancel, sinfo) find the cluster through SLURM_CONF.
#
# Made for a root, cgroup-less machine: SlurmUser=SlurmdUser=root, proctrack/linuxproc, task/none,
# no accounting storage: the real sacct fails, finished jobs stay visible to scontrol/squeue for
# MinJobAge seconds and are listed in STATE_DIR/jobcomp.log; STATE_DIR/bin/sacct answers from those.
# Partitions: debug (default) and urgent, whose jobs preempt (requeue) the jobs of debug.
#
# Several nodes (--nodes N, N >= 2, or POA_SLURM_NODES=N): one munged and one slurmctld on this
# machine, and N slurmd, each in its own network namespace (ip netns) and UTS namespace (its own
# hostname): nodes poa-node01 .. poa-nodeNN (network namespaces of the same names) at
# $POA_SLURM_SUBNET.11 .. (default subnet 10.233.0), each with a veth pair whose other end is on
# the bridge poa-br0 ($POA_SLURM_SUBNET.1, slurmctld's address). Nothing is routed beyond that
# bridge. Inside a node, /etc/hosts is STATE_DIR/hosts (bind-mounted in the node's own mount
# namespace) and names every node, so a job's node list (poa-node[01-02]) resolves to the nodes'
# addresses. The node count is recorded in STATE_DIR/nodes; status/stop read it. `stop` also
# removes the namespaces and the bridge. Only one such cluster per machine (the names are fixed).
#   slurm/local_cluster.sh exec NODE CMD...   # run CMD on node NODE (its namespaces), e.g.
#                                             #   exec poa-node02 hostname
set -euo pipefail

CMD="${1:-}"
shift || true
NODES="${POA_SLURM_NODES:-}"
POS=()
while (($#)); do
    case "$1" in
        --nodes) NODES="${2:-}"; shift ;;
        --nodes=*) NODES="${1#*=}" ;;
        *) POS+=("$1") ;;
    esac
    shift
done
if [[ "$CMD" == exec ]]; then
    EXEC_ARGS=("${POS[@]}")
    POS=()
fi
D="${POS[0]:-${POA_SLURM_DIR:-/tmp/poa-slurm}}"
SUBNET="${POA_SLURM_SUBNET:-10.233.0}"
BRIDGE=poa-br0
CTLD_PORT="${POA_SLURM_CTLD_PORT:-6917}"
SLURMD_PORT="${POA_SLURM_D_PORT:-6918}"
START_TIMEOUT="${POA_SLURM_START_TIMEOUT:-60}"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd -P); }

# pid_of NAME: the recorded PID of daemon NAME (munged|slurmctld|slurmd) if that process is alive
# and is really the daemon of this STATE_DIR (its command line names STATE_DIR's slurm.conf or munge
# socket, or its environment carries our marker); nothing otherwise (stale pid file, reused PID).
# NAME slurmd-NODE: the slurmd of node NODE of a several-node cluster.
pid_of() {
    local name="$1" f="$D/$1.pid" pid
    [[ -s "$f" ]] || return 0
    pid="$(tr -dc '0-9' < "$f")"
    [[ -n "$pid" && -d "/proc/$pid" ]] || return 0
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${name%%-*}" ]] || return 0
    if { tr '\0' '\n' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qxF -e "$D/slurm.conf" -e "--socket=$D/munge.socket" \
        || { tr '\0' '\n' < "/proc/$pid/environ"; } 2>/dev/null | grep -qxF "POA_SLURM_STATE_DIR=$D"; then
        echo "$pid"
    fi
}

export_line() {
    echo "export SLURM_CONF=$D/slurm.conf"
    echo "export PATH=$D/bin:\$PATH  # sacct stand-in (no accounting storage)"
}

# start_failed MESSAGE: show the logs, stop what was started, exit 1.
start_failed() {
    logs_tail
    cmd_stop >/dev/null 2>&1 || true
    die "$*"
}

logs_tail() {
    local f n
    local files=(munged.log slurmctld.log slurmd.log slurmctld.out slurmd.out)
    for n in $(node_names); do files+=("slurmd-$n.log" "slurmd-$n.out"); done
    for f in "${files[@]}"; do
        if [[ -s "$D/$f" ]]; then
            echo "----- $D/$f (tail) -----" >&2
            tail -n 25 "$D/$f" >&2
        fi
    done
}

# The node count of this cluster: --nodes / POA_SLURM_NODES, else the one recorded at start, else 1.
node_count() {
    if [[ -n "$NODES" ]]; then echo "$NODES"
    elif [[ -s "$D/nodes" ]]; then tr -dc '0-9' < "$D/nodes"
    else echo 1; fi
}

# Names of the namespaced nodes (nothing for a single-node cluster): poa-node01 poa-node02 ...
node_names() {
    local n i
    n="$(node_count)"
    ((n >= 2)) || return 0
    for ((i = 1; i <= n; i++)); do printf 'poa-node%02d\n' "$i"; done
}

node_addr() {  # node_addr poa-nodeNN
    local i="${1#poa-node}"
    echo "$SUBNET.$((10 + 10#$i))"
}

# The per-node namespaces: a bridge on this machine, and per node a network namespace with a veth
# pair (the node's end is its eth0, the other end is on the bridge), lo up, no route beyond the bridge.
net_up() {
    command -v ip >/dev/null 2>&1 || die "ip not found (run: $0 install, which installs iproute2)"
    local n ns
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        # nf_call_iptables 0: bridged traffic between the nodes bypasses the host's firewall rules.
        ip link add "$BRIDGE" type bridge nf_call_iptables 0 2>/dev/null || ip link add "$BRIDGE" type bridge \
            || die "cannot create the bridge $BRIDGE"
        echo "$D" > "$D/net.owner"
    fi
    ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    {
        echo "127.0.0.1 localhost"
        echo "$SUBNET.1 $(hostname -s)"
        for n in $(node_names); do echo "$(node_addr "$n") $n"; done
    } > "$D/hosts"
    chmod 0644 "$D/hosts"
    for n in $(node_names); do
        ns="$n"
        if ! ip netns list | grep -qw "^$ns"; then
            ip netns add "$ns" || die "cannot create the network namespace $ns"
        fi
        if ! ip link show "$n-h" >/dev/null 2>&1; then
            ip -n "$ns" link del eth0 2>/dev/null || true
            ip link add "$n-h" type veth peer name eth0 netns "$ns" || die "cannot create the veth pair of $n"
        fi
        ip link set "$n-h" master "$BRIDGE" up
        ip -n "$ns" addr replace "$(node_addr "$n")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

net_down() {
    local n
    for n in $(node_names); do
        ip netns pids "$n" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
        ip link del "$n-h" 2>/dev/null || true
        ip netns del "$n" 2>/dev/null || true
    done
    if [[ -s "$D/net.owner" && "$(cat "$D/net.owner")" == "$D" ]]; then
        ip link del "$BRIDGE" 2>/dev/null || true
        rm -f "$D/net.owner"
    fi
}

write_conf() {
    local host cpus mem_mb node_line
    host="$(hostname -s)"
    cpus="$(nproc --all 2>/dev/null || getconf _NPROCESSORS_ONLN)"
    # RealMemory a bit under MemTotal, or the node would be drained for "Low RealMemory".
    mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)"
    # The topology slurmd itself detects (CPUs/Boards/Sockets/Cores/Threads), else just CPUs.
    node_line="$(slurmd -C 2>/dev/null | head -n 1 \
        | sed -n 's/^NodeName=[^ ]* \(CPUs=.*\) RealMemory=.*$/\1/p')"
    [[ -n "$node_line" ]] || node_line="CPUs=$cpus"
    # POA_SLURM_CPUS: announce that many CPUs instead (oversubscribe a small machine; slurmd is told to
    # trust the configuration rather than the hardware).
    local overrides=""
    if [[ -n "${POA_SLURM_CPUS:-}" ]]; then
        node_line="CPUs=$POA_SLURM_CPUS"
        overrides="SlurmdParameters=config_overrides"
    fi
    # A hostname that does not resolve would break slurmd registration and srun; the address is
    # given explicitly so that only this machine is ever contacted.
    local addr=127.0.0.1 spool="$D/spool" dpid="$D/slurmd.pid" dlog="$D/slurmd.log" nodes_conf="" part_nodes="$host"
    # A node that stops answering is DOWN after about SlurmdTimeout + MessageTimeout (the ping retries the
    # connection that long); its jobs end, and --requeue ones are requeued. Short for several nodes, where
    # tests kill nodes (slurmd answers a ping in milliseconds, even on a loaded machine).
    local slurmd_timeout=60 msg_timeout=10 n
    if (($(node_count) >= 2)); then
        addr="$SUBNET.1"
        # One file/folder per node (%n: the node name given to slurmd with -N).
        spool="$D/spool-%n" dpid="$D/slurmd-%n.pid" dlog="$D/slurmd-%n.log"
        for n in $(node_names); do
            nodes_conf+="NodeName=$n NodeAddr=$(node_addr "$n") NodeHostname=$n $node_line RealMemory=$mem_mb State=UNKNOWN"$'\n'
        done
        part_nodes="poa-node[01-$(printf '%02d' "$(node_count)")]"
        slurmd_timeout=5 msg_timeout=5
    else
        nodes_conf="NodeName=$host NodeAddr=$addr NodeHostname=$host $node_line RealMemory=$mem_mb State=UNKNOWN"
    fi
    cat > "$D/slurm.conf.tmp" <<EOF
# Generated by slurm/local_cluster.sh: a test cluster on one machine. Do not edit (regenerated on start).
ClusterName=poa
SlurmctldHost=$host($addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# socket: the munged of this STATE_DIR (also used by every client command reading this file).
# cred_expire: step credential lifetime; it is also the delay before a requeued job may start
# again (default 120 s), hence the minimum, 5 s.
AuthInfo=socket=$D/munge.socket,cred_expire=5
StateSaveLocation=$D/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$dpid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$dlog
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$D/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every 1-2 s (defaults: 30/60 s), e.g. a requeued job once its BeginTime passed.
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
$overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/jobcomp.log
ReturnToService=2
JobRequeue=1
# Refuse at submission (instead of pending forever) jobs that no partition could ever run.
EnforcePartLimits=ALL
# SIGTERM .. SIGKILL grace on scancel / time limit / requeue.
KillWait=5
UnkillableStepTimeout=30
# Finished jobs stay visible to scontrol/squeue this long.
MinJobAge=300
InactiveLimit=0
Waittime=0
MessageTimeout=$msg_timeout
SlurmctldTimeout=30
SlurmdTimeout=$slurmd_timeout
$nodes_conf
# Preemption: a job submitted to 'urgent' preempts (requeues) jobs of 'debug'. Preempted jobs get
# their --signal signal (preempt_send_user_signal; SIGTERM without one), then SIGTERM/SIGKILL after GraceTime.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=$part_nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=$part_nodes MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
    mv "$D/slurm.conf.tmp" "$D/slurm.conf"
    : > "$D/plugstack.conf"
}

# STATE_DIR/bin/sacct: a stand-in for sacct, which needs accounting storage (slurmdbd) that this
# cluster does not have. It answers the common queries (sacct -j ID[,ID] -o FIELD,... [-P|--parsable2]
# [-n|--noheader]; other options are ignored, output is always '|'-separated) from
# `scontrol show job` while slurmctld knows the job (until MinJobAge after it ended), then from the
# job completion log. Enough for submitit's status polling (sacct -o JobID,State,NodeList --parsable2
# -j ID), which otherwise sees every job as UNKNOWN.
write_sacct() {
    mkdir -p "$D/bin"
    cat > "$D/bin/sacct.tmp" <<'SACCT'
#!/usr/bin/env bash
# sacct stand-in for a cluster without accounting storage (written by slurm/local_cluster.sh).
set -uo pipefail
fields="JobID,JobName,Partition,State,ExitCode,NodeList" header=1 ids=""
while (($#)); do
    case "$1" in
        -j | --jobs) ids+=" ${2:-}"; shift ;;
        --jobs=*) ids+=" ${1#*=}" ;;
        -j*) ids+=" ${1#-j}" ;;
        -o | --format) fields="${2:-}"; shift ;;
        --format=*) fields="${1#*=}" ;;
        -n | --noheader) header=0 ;;
        -S | -E | --starttime | --endtime | -u | --user | -A | --accounts | -M | --clusters | -s | --state) shift ;;
        *) ;;
    esac
    shift
done
ids="${ids//,/ }"
[[ -n "${ids// /}" ]] || ids="$(squeue -h -t all -o %A 2>/dev/null)"
comp="$(dirname "$(dirname "$(readlink -f "$0")")")/jobcomp.log"
if ((header)); then echo "${fields//,/|}"; fi
for j in $ids; do
    lines="$(scontrol show job -o "$j" 2>/dev/null)"
    if [[ -z "$lines" ]]; then
        lines="$(grep -E "^JobId=${j%%_*} " "$comp" 2>/dev/null | tail -n 1)"
    fi
    [[ -n "$lines" ]] || continue
    awk -v names="$fields" '{
        delete v; delete m; out = ""
        for (i = 1; i <= NF; i++) { p = index($i, "="); if (p) v[substr($i, 1, p - 1)] = substr($i, p + 1) }
        id = v["JobId"]
        if (v["ArrayJobId"] != "" && v["ArrayTaskId"] != "") {
            t = v["ArrayTaskId"]; if (t ~ /[-,]/) t = "[" t "]"; id = v["ArrayJobId"] "_" t
        }
        m["jobid"] = id; m["jobidraw"] = v["JobId"]; m["jobname"] = v["JobName"] v["Name"]
        m["state"] = v["JobState"]; m["nodelist"] = v["NodeList"]; m["partition"] = v["Partition"]
        m["exitcode"] = v["ExitCode"]; m["derivedexitcode"] = v["DerivedExitCode"]
        m["start"] = v["StartTime"]; m["end"] = v["EndTime"]; m["submit"] = v["SubmitTime"]
        m["elapsed"] = v["RunTime"]; m["timelimit"] = v["TimeLimit"]; m["nnodes"] = v["NumNodes"] v["NodeCnt"]
        m["ncpus"] = v["NumCPUs"] v["ProcCnt"]; m["alloccpus"] = m["ncpus"]; m["ntasks"] = v["NumTasks"]
        m["restarts"] = v["Restarts"]; m["reason"] = v["Reason"]; m["workdir"] = v["WorkDir"]
        m["user"] = v["UserId"]; sub(/\(.*/, "", m["user"])
        k = split(names, f, ",")
        for (i = 1; i <= k; i++) { name = tolower(f[i]); sub(/%.*/, "", name); out = out (i > 1 ? "|" : "") m[name] }
        print out
    }' <<< "$lines"
done
exit 0
SACCT
    chmod 0755 "$D/bin/sacct.tmp"
    mv "$D/bin/sacct.tmp" "$D/bin/sacct"
}

start_munged() {
    if [[ -n "$(pid_of munged)" ]]; then return 0; fi
    rm -f "$D/munged.pid" "$D/munge.socket" "$D/munge.socket.lock"
    if [[ ! -s "$D/munge.key" ]]; then
        (umask 077 && dd if=/dev/urandom of="$D/munge.key" bs=1024 count=1 status=none)
    fi
    chown root:root "$D/munge.key" 2>/dev/null || true
    chmod 0400 "$D/munge.key"
    # --force: accept a socket/key outside munge's usual, root-owned, non-world-writable directories.
    munged --force --key-file="$D/munge.key" --socket="$D/munge.socket" --pid-file="$D/munged.pid" \
        --log-file="$D/munged.log" --seed-file="$D/munged.seed" </dev/null >>"$D/munged.log" 2>&1 \
        || start_failed "munged failed to start"
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -S "$D/munge.socket" && -n "$(pid_of munged)" ]] && return 0
        sleep 0.1
    done
    start_failed "munged did not come up (no socket $D/munge.socket)"
}

start_daemon() {  # start_daemon NAME ARGS...
    local name="$1"; shift
    if [[ -n "$(pid_of "$name")" ]]; then return 0; fi
    rm -f "$D/$name.pid"
    # The marker in the environment identifies this cluster's daemons and the slurmstepd processes
    # slurmd starts (they inherit slurmd's environment).
    env POA_SLURM_STATE_DIR="$D" SLURM_CONF="$D/slurm.conf" "$name" -f "$D/slurm.conf" "$@" \
        </dev/null >>"$D/$name.out" 2>&1 || start_failed "$name failed to start"
    wait_pid "$name"
}

wait_pid() {  # wait_pid NAME: until NAME's pid file names a live daemon
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -n "$(pid_of "$1")" ]] && return 0
        sleep 0.1
    done
    start_failed "$1 did not start (no live PID in $D/$1.pid)"
}

# start_node NODE: the slurmd of NODE in NODE's network namespace, in a new UTS namespace with the
# hostname NODE and a new mount namespace where STATE_DIR/hosts is /etc/hosts. Its job steps inherit
# all three. (Not `ip netns exec`: it mounts a new /sys, without the cgroup file system slurmd wants.)
start_node() {
    local n="$1" name="slurmd-$1"
    if [[ -n "$(pid_of "$name")" ]]; then return 0; fi
    rm -f "$D/$name.pid"
    mkdir -p "$D/spool-$n"
    # shellcheck disable=SC2016
    nsenter --net="/run/netns/$n" -- unshare --uts --mount --propagation slave -- /bin/sh -c \
        'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$D/hosts" "$n" \
        env POA_SLURM_STATE_DIR="$D" SLURM_CONF="$D/slurm.conf" slurmd -f "$D/slurm.conf" -N "$n" \
        </dev/null >>"$D/$name.out" 2>&1 || start_failed "slurmd of $n failed to start"
    wait_pid "$name"
}

# The slurmd daemons' names for pid_of: slurmd, or slurmd-NODE per node.
slurmd_names() {
    if (($(node_count) >= 2)); then node_names | sed 's/^/slurmd-/'; else echo slurmd; fi
}

# The PIDs of the running slurmd daemons of this cluster; fails (status 1) unless all are running.
slurmd_pids() {
    local name pid all=0
    for name in $(slurmd_names); do
        pid="$(pid_of "$name")"
        if [[ -n "$pid" ]]; then echo "$pid"; else all=1; fi
    done
    return "$all"
}

cmd_install() {
    if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 \
        && command -v ip >/dev/null 2>&1 && command -v unshare >/dev/null 2>&1; then
        echo "slurm already installed: $(slurmctld -V)"
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || die "install needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # iproute2 (ip netns, veth, bridge) and util-linux (unshare) for the several-node cluster.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge iproute2 util-linux >/dev/null
    echo "installed: $(slurmctld -V)"
}

cmd_start() {
    command -v slurmctld >/dev/null 2>&1 || die "slurmctld not found (run: $0 install)"
    command -v munged >/dev/null 2>&1 || die "munged not found (run: $0 install)"
    [[ "$(id -u)" == 0 ]] || die "this cluster runs its daemons as root (SlurmUser=root); run as root"
    [[ "$(node_count)" =~ ^[1-9][0-9]?$ ]] || die "--nodes: expected 1 to 99, got '$(node_count)'"
    D="$(abs_dir "$D")"
    export SLURM_CONF="$D/slurm.conf"
    local recorded=1
    [[ -s "$D/nodes" ]] && recorded="$(tr -dc '0-9' < "$D/nodes")"
    if [[ -n "$(pid_of slurmctld)" && "$recorded" != "$(node_count)" ]]; then
        die "the cluster in $D runs $recorded node(s), not $(node_count): stop it first ($0 stop $D)"
    fi
    if [[ -n "$(pid_of slurmctld)" && -n "$(pid_of munged)" ]] && slurmd_pids >/dev/null; then
        echo "local slurm cluster already running in $D" >&2
        export_line
        return 0
    fi
    mkdir -p "$D/state" "$D/spool"
    chmod 0755 "$D"
    write_sacct
    local n
    if (($(node_count) >= 2)); then
        for n in $(node_names); do
            if ip netns list 2>/dev/null | grep -qw "^$n" && [[ "$recorded" != "$(node_count)" ]]; then
                die "the network namespace $n exists already (another several-node cluster?): stop that one first, or remove it: ip netns del $n"
            fi
        done
        echo "$(node_count)" > "$D/nodes"
        net_up
    else
        rm -f "$D/nodes"
    fi
    if [[ -z "$(pid_of slurmctld)" && -z "$(slurmd_pids)" ]]; then
        write_conf
    fi
    local t0=$SECONDS
    start_munged
    if [[ -z "$(pid_of slurmctld)" ]]; then
        start_daemon slurmctld -c -i  # -c: a clean cluster, no jobs from an earlier run
    fi
    if (($(node_count) >= 2)); then
        for n in $(node_names); do start_node "$n"; done
    else
        start_daemon slurmd
    fi
    local states="" bad="" state=""
    while ((SECONDS - t0 < START_TIMEOUT)); do
        # One line per node: NAME STATE; done when every node can run jobs.
        states="$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null || true)"
        bad="$(awk '$2 !~ /^(idle|mixed|allocated|completing)$/' <<< "$states")"
        [[ -n "$states" && -z "$bad" ]] && break
        while read -r n state; do
            case "$state" in
                down* | drain* | fail*) scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true ;;
            esac
        done <<< "$bad"
        if [[ -z "$(pid_of slurmctld)" ]] || ! slurmd_pids >/dev/null; then
            start_failed "a slurm daemon died during start-up (state dir $D)"
        fi
        sleep 0.5
    done
    if [[ -z "$states" || -n "$bad" ]]; then
        sinfo -N -l >&2 2>&1 || true
        start_failed "node(s) not idle after ${START_TIMEOUT}s (${bad:-no node}; state dir $D)"
    fi
    if (($(node_count) >= 2)); then
        echo "local slurm cluster up in $((SECONDS - t0))s: nodes $(node_names | tr '\n' ' ')(namespaces, $SUBNET.0/24)," \
            "partition debug, state dir $D" >&2
    else
        echo "local slurm cluster up in $((SECONDS - t0))s: node $(hostname -s), partition debug, state dir $D" >&2
    fi
    export_line
}

# PIDs of slurmstepd processes started by this cluster's slurmd (marked by the inherited environment).
stepd_pids() {
    local p
    for p in /proc/[0-9]*; do
        [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
        if { tr '\0' '\n' < "$p/environ"; } 2>/dev/null | grep -qxF "POA_SLURM_STATE_DIR=$D"; then
            echo "${p#/proc/}"
        fi
    done
}

# descendants PID...: all descendants of the given PIDs.
descendants() {
    local -A children=()
    local p ppid
    for p in /proc/[0-9]*; do
        ppid="$(awk '{sub(/^.*\) /, ""); print $2}' "$p/stat" 2>/dev/null)" || continue
        [[ -n "$ppid" ]] && children[$ppid]+="${p#/proc/} "
    done
    local queue=("$@") out=() c
    while ((${#queue[@]})); do
        p="${queue[0]}"; queue=("${queue[@]:1}")
        for c in ${children[$p]:-}; do out+=("$c"); queue+=("$c"); done
    done
    echo "${out[@]:-}"
}

kill_pids() {  # kill_pids PID...: TERM, wait up to 10 s, then KILL
    local pids=() p i
    for p in "$@"; do [[ -n "$p" && -d "/proc/$p" ]] && pids+=("$p"); done
    ((${#pids[@]})) || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        local alive=()
        for p in "${pids[@]}"; do
            # A zombie is dead for our purpose.
            if [[ -d "/proc/$p" ]] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; then alive+=("$p"); fi
        done
        ((${#alive[@]})) || return 0
        pids=("${alive[@]}")
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

cmd_stop() {
    [[ -d "$D" ]] || { echo "not running (no $D)"; return 0; }
    D="$(cd "$D" && pwd -P)"
    export SLURM_CONF="$D/slurm.conf"
    local ctld slurmds munged
    ctld="$(pid_of slurmctld)"; slurmds="$(slurmd_pids | tr '\n' ' ' || true)"; munged="$(pid_of munged)"
    if [[ -n "$ctld" && -n "$slurmds" ]]; then
        # Cancel the jobs first, so that their steps end normally (bounded wait).
        local jobs i
        jobs="$(squeue -h -o %A 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z "$(squeue -h -o %A -t all 2>/dev/null | head -n 1)" ]] && break
                [[ -z "$(stepd_pids)" ]] && break
                sleep 0.5
            done
        fi
    fi
    # shellcheck disable=SC2086
    kill_pids $slurmds
    # Leftover job steps of this cluster and everything under them.
    local steps
    steps="$(stepd_pids)"
    if [[ -n "$steps" ]]; then
        # shellcheck disable=SC2086
        kill_pids $(descendants $steps) $steps
    fi
    kill_pids "$ctld"
    kill_pids "$munged"
    local name
    for name in $(slurmd_names); do rm -f "$D/$name.pid"; done
    rm -f "$D/slurmctld.pid" "$D/munged.pid"
    if (($(node_count) >= 2)); then
        net_down  # also ends whatever else still runs in the nodes' namespaces
        rm -f "$D/nodes"
    fi
    if [[ -n "$ctld$slurmds$munged" ]]; then
        echo "local slurm cluster in $D stopped"
    else
        echo "not running ($D)"
    fi
}

cmd_status() {
    D="$(cd "$D" 2>/dev/null && pwd -P)" || { echo "not running"; return 1; }
    if [[ -z "$(pid_of slurmctld)" || -z "$(pid_of munged)" ]] || ! slurmd_pids >/dev/null; then
        echo "not running ($D)"
        return 1
    fi
    SLURM_CONF="$D/slurm.conf" sinfo
}

# exec NODE CMD...: run CMD in the namespaces (network, UTS, mount) of NODE's running slurmd.
cmd_exec() {
    local n="${EXEC_ARGS[0]:-}" pid
    ((${#EXEC_ARGS[@]} >= 2)) || die "usage: $0 exec NODE CMD..."
    D="$(cd "$D" 2>/dev/null && pwd -P)" || die "no cluster in $D"
    pid="$(pid_of "slurmd-$n")"
    [[ -n "$pid" ]] || die "node $n is not running in $D (nodes: $(node_names | tr '\n' ' '))"
    exec nsenter -t "$pid" -n -u -m -- "${EXEC_ARGS[@]:1}"
}

case "$CMD" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    exec) D="${POA_SLURM_DIR:-/tmp/poa-slurm}"; cmd_exec ;;
    env) D="$(realpath -m "$D")"; export_line ;;
    *) echo "usage: $0 {install|start [--nodes N]|stop|status|env} [STATE_DIR] | exec NODE CMD..." >&2; exit 2 ;;
esac
