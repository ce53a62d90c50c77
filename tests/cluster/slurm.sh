#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the cluster tests (tests/cluster/).
#
#   sudo bash tests/cluster/slurm.sh up       # install what is missing, start, wait until n1 and n2 are idle
#   bash tests/cluster/slurm.sh run CMD ...   # run a Slurm client (sbatch, squeue, scontrol ...) against it
#   bash tests/cluster/slurm.sh status        # sinfo, or why the cluster is not up
#   sudo bash tests/cluster/slurm.sh down     # stop exactly what `up` started, remove its namespaces and files
#
# Three hosts, each its own network, UTS and mount namespace: ctl (slurmctld, 10.77.0.1), n1 and
# n2 (a slurmd each, 10.77.0.11/12), joined by a private bridge with no address on this host and no
# route anywhere else: traffic stays between these namespaces. Each host sees its own hostname and
# /etc/hosts; all share this machine's file system (the "shared file system" a cluster has) and
# one munged. Linux only, as root (namespaces, daemons, apt-get).
set -euo pipefail

DIR=${GPT2REPRO_SLURM_DIR:-/tmp/gpt2repro-slurm}
NET=10.77.0
BRIDGE=g2r-br0
HOSTS=(ctl n1 n2)
declare -A ADDR=([ctl]=$NET.1 [n1]=$NET.11 [n2]=$NET.12)
PACKAGES=(slurm-wlm munge)

die() { echo "slurm.sh: $*" >&2; exit 1; }

check_can_run() {
  [ "$(uname -s)" = Linux ] || die "needs Linux (network namespaces); this is $(uname -s)."
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, daemons, apt-get); run it with sudo."
  for tool in ip nsenter unshare mount; do
    command -v "$tool" >/dev/null || die "needs '$tool' (util-linux / iproute2); install it with apt-get."
  done
  ip netns add g2r-probe 2>/dev/null || die "cannot create network namespaces here (a container without CAP_SYS_ADMIN?)."
  ip netns del g2r-probe
}

install_missing() {
  local missing=()
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || missing+=(slurm-wlm)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} = 0 ] && return
  echo "slurm.sh: installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${PACKAGES[@]}" >"$DIR/apt.log" 2>&1 ||
    { apt-get update -qq >>"$DIR/apt.log" 2>&1 && apt-get install -y -qq "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1; } ||
    die "could not install ${PACKAGES[*]} with apt-get (see $DIR/apt.log)."
}

# Run "$@" inside host $1's namespaces: its network, and a UTS + mount namespace where the
# hostname is $1 and /etc/hosts, /etc/resolv.conf are its own (`ip netns exec` would remount
# /sys and hide the cgroup file system that slurmd needs).
in_host() {
  local host=$1
  shift
  nsenter --net="/run/netns/g2r-$host" unshare --uts --mount --propagation private \
    sh -c 'mount --bind "$1/hosts" /etc/hosts && mount --bind "$1/resolv.conf" /etc/resolv.conf &&
           hostname "$2" && shift 2 && exec "$@"' sh "$DIR/etc" "$host" "$@"
}

write_config() {
  mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/munge"
  {
    echo "127.0.0.1 localhost"
    for h in "${HOSTS[@]}"; do
      # torch's c10d reverse-resolves IPv4-mapped peer addresses: the second form spares its warnings.
      echo "${ADDR[$h]} $h"
      echo "::ffff:${ADDR[$h]} $h"
    done
  } >"$DIR/etc/hosts"
  echo "nameserver 127.0.0.1" >"$DIR/etc/resolv.conf"
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=gpt2repro
SlurmctldHost=ctl(${ADDR[ctl]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire + 1 s (121 s by default) and up to sched_interval before it runs again.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmdTimeout=30
KillWait=30
NodeName=n1 NodeAddr=${ADDR[n1]} NodeHostname=n1 CPUs=$(nproc) State=UNKNOWN
NodeName=n2 NodeAddr=${ADDR[n2]} NodeHostname=n2 CPUs=$(nproc) State=UNKNOWN
PartitionName=main Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start_network() {
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" up
  for h in "${HOSTS[@]}"; do
    ip netns add "g2r-$h"
    ip link add "g2r-$h" type veth peer name eth0 netns "g2r-$h"
    ip link set "g2r-$h" master "$BRIDGE" up
    ip -n "g2r-$h" addr add "${ADDR[$h]}/24" dev eth0
    ip -n "g2r-$h" link set eth0 up
    ip -n "g2r-$h" link set lo up
  done
}

start_daemons() {
  dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  export SLURM_CONF=$DIR/etc/slurm.conf
  in_host ctl slurmctld -f "$SLURM_CONF" -i
  for h in n1 n2; do
    mkdir -p "$DIR/spool/$h"
    in_host "$h" slurmd -f "$SLURM_CONF"
  done
}

wait_idle() {
  local deadline=$((SECONDS + ${1:-60})) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(client sinfo -h -N -o '%N %t' 2>/dev/null | sort | tr '\n' ' ' || true)
    [ "$state" = "n1 idle n2 idle " ] && return 0
    sleep 0.5
  done
  die "the nodes did not come up within ${1:-60} s (sinfo: ${state:-no answer}); see $DIR/log/."
}

client() { SLURM_CONF=$DIR/etc/slurm.conf in_host ctl "$@"; }

stop_pidfile() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  # Whatever a crashed `up` or a test left: job steps first (the slurmd's children), then daemons.
  for h in n1 n2; do
    if [ -f "$DIR/slurmd-$h.pid" ]; then
      pkill -9 -P "$(cat "$DIR/slurmd-$h.pid")" 2>/dev/null || true
    fi
  done
  pkill -9 -f "slurmstepd: \[" 2>/dev/null || true
  for h in n1 n2; do stop_pidfile "$DIR/slurmd-$h.pid"; done
  stop_pidfile "$DIR/slurmctld.pid"
  stop_pidfile "$DIR/munge/munged.pid"
  for h in "${HOSTS[@]}"; do
    # Anything still inside a namespace (a job's processes) goes with it.
    if [ -e "/run/netns/g2r-$h" ]; then
      for pid in $(ip netns pids "g2r-$h" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "g2r-$h" 2>/dev/null || true
    fi
    ip link del "g2r-$h" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "$DIR"
}

case "${1:-}" in
  up)
    check_can_run
    [ -e "/run/netns/g2r-ctl" ] && down  # a half-started or stale cluster
    mkdir -p "$DIR"
    install_missing
    write_config
    start_network
    start_daemons
    wait_idle 60
    echo "slurm.sh: up: n1 and n2 idle (SLURM_CONF=$DIR/etc/slurm.conf; clients: bash $0 run CMD)"
    ;;
  run)
    shift
    [ -e "/run/netns/g2r-ctl" ] || die "the cluster is not up; run: sudo bash $0 up"
    client "$@"
    ;;
  on)  # on HOST CMD ...: a command inside one host's namespaces (tests: kill a node's processes)
    shift
    in_host "$@"
    ;;
  status)
    [ -e "/run/netns/g2r-ctl" ] || die "down (no namespace g2r-ctl)"
    client sinfo -N
    ;;
  down)
    [ "$(id -u)" = 0 ] || die "needs root; run it with sudo."
    down
    echo "slurm.sh: down"
    ;;
  *)
    echo "usage: $0 up|run CMD...|status|down" >&2
    exit 2
    ;;
esac
