#!/usr/bin/env bash
# A real Slurm 22.05 cluster on this machine, over loopback: munged, slurmctld and three slurmd
# (nodes n0..n2, 2 fake GPUs each) — enough for a heterogeneous job of up to 1+2 nodes.
#
#   scripts/slurm/up.sh [--holder ID]      # then: export SLURM_CONF=/tmp/maspo-slurm/etc/slurm.conf
#   scripts/slurm/down.sh [--holder ID]
#
# Installs the Debian packages when missing (slurmctld slurmd slurm-client munge; root, apt-get),
# writes slurm.conf/gres.conf/fake device files under $MASPO_SLURM_DIR (default /tmp/maspo-slurm),
# starts the daemons and waits until sinfo shows every node idle. Idempotent: a cluster that is
# already up is reused. With --holder, down.sh --holder stops the cluster only when no other
# live holder (and no plain `up.sh`) still uses it, so two `make test` runs can share it.
# On failure the reason is also written to $MASPO_SLURM_DIR/unavailable (tests marked slurm
# report it when they skip).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

holder=manual
if [ "${1:-}" = "--holder" ]; then holder=${2:?--holder needs an id}; fi

mkdir -p "$MASPO_SLURM_DIR"
exec 9>"$MASPO_SLURM_DIR/lock"
flock 9
rm -f "$MASPO_SLURM_DIR/unavailable"

fail() {
  log "$*"
  echo "$*" >"$MASPO_SLURM_DIR/unavailable"
  exit 1
}

t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || fail "needs root (apt-get install, munged as user munge, slurmd as root); run as root"

# ------------------------------------------------------------------------------ install
need_install() {
  local c
  for c in slurmctld slurmd sinfo sbatch scontrol munged munge; do
    command -v "$c" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin command -v "$c" >/dev/null 2>&1 || return 0
  done
  return 1
}
PATH=$PATH:/usr/sbin:/sbin
if need_install; then
  command -v apt-get >/dev/null || fail "slurm is not installed and there is no apt-get (Debian/Ubuntu only)"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  pkgs=(slurmctld slurmd slurm-client munge)
  apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
      >"$MASPO_SLURM_DIR/apt.log" 2>&1
  }
  if ! apt_install; then
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$MASPO_SLURM_DIR/apt.log" 2>&1 || true
    apt_install || fail "apt-get install ${pkgs[*]} failed; see $MASPO_SLURM_DIR/apt.log"
  fi
  log "installed in $(elapsed "$t0")s"
fi
t_start=$(date +%s.%N)

add_holder() {
  mkdir -p "$MASPO_SLURM_DIR/holders"
  touch "$MASPO_SLURM_DIR/holders/$holder"
}

ctld_pid=$(pid_of "$MASPO_SLURM_DIR/run/slurmctld.pid")
if pid_alive "$ctld_pid" && [ -f "$SLURM_CONF" ] && sinfo -h >/dev/null 2>&1; then
  add_holder
  log "already up (SLURM_CONF=$SLURM_CONF)"
  echo "export SLURM_CONF=$SLURM_CONF"
  exit 0
fi
# A previous cluster that died half-way: stop what is left of it before starting afresh.
MASPO_SLURM_LOCKED=1 "$here/down.sh" --force >/dev/null 2>&1 || true

# ------------------------------------------------------------------------------ munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile /etc/munge/munge.key >/dev/null 2>&1 ||
      fail "no /etc/munge/munge.key and mungekey could not create one"
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- munged >"$MASPO_SLURM_DIR/munged.out" 2>&1 9>&- ||
    fail "munged did not start: $(cat "$MASPO_SLURM_DIR/munged.out")"
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || fail "munged started but munge -n | unmunge fails"
  cp /run/munge/munged.pid "$MASPO_SLURM_DIR/munged.pid.ours" 2>/dev/null || true
fi

# ------------------------------------------------------------------------------ config
d=$MASPO_SLURM_DIR
rm -rf "$d/state" "$d/spool" "$d/log" "$d/run" "$d/holders"
mkdir -p "$d/etc" "$d/state" "$d/log" "$d/run" "$d/dev"
for n in "${NODES[@]}"; do mkdir -p "$d/spool/$n"; done
for i in $(seq 0 $((GPUS_PER_NODE - 1))); do : >"$d/dev/gpu$i"; done  # gres File= must exist

host=$(hostname -s)
# The nodes' sizes as slurmd sees this machine (a node configured larger than it is gets drained).
hw=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')

{
  cat <<EOF
# Written by scripts/slurm/up.sh: a loopback test cluster (three slurmd on one host).
ClusterName=maspo
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Also how long a requeued job waits before it may start again (Slurm's default: 120 s).
AuthInfo=cred_expire=30
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool/%n
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$d/run/slurmd-%n.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd-%n.log
# No cgroups in a container: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# Heterogeneous jobs are started by the backfill scheduler only; run it every second.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
# Bind the address of the configured hostname (127.0.0.1), never 0.0.0.0.
CommunicationParameters=NoInAddrAny
ReturnToService=2
MpiDefault=none
# No slurmdbd: no sacct. Finished jobs stay in scontrol for an hour, and every job's end
# (state, exit code, restarts) is appended to jobcomp.txt.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$d/log/jobcomp.txt
MinJobAge=3600
KillWait=10
MessageTimeout=30
SlurmdTimeout=300
InactiveLimit=0
EOF
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} $hw Gres=gpu:$GPUS_PER_NODE State=UNKNOWN"
  done
  echo "PartitionName=$PARTITION Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
} >"$SLURM_CONF"
# slurmd reads gres.conf next to slurm.conf; without File= it drops the GPUs.
echo "NodeName=$(IFS=,; echo "${NODES[*]}") Name=gpu File=$d/dev/gpu[0-$((GPUS_PER_NODE - 1))]" >"$d/etc/gres.conf"

# ------------------------------------------------------------------------------ start
slurmctld -f "$SLURM_CONF" -c -i >"$d/log/slurmctld.out" 2>&1 9>&- ||
  fail "slurmctld did not start: $(tail -5 "$d/log/slurmctld.log" 2>/dev/null)"
for n in "${NODES[@]}"; do
  slurmd -f "$SLURM_CONF" -N "$n" >"$d/log/slurmd-$n.out" 2>&1 9>&- ||
    fail "slurmd -N $n did not start: $(tail -5 "$d/log/slurmd-$n.log" 2>/dev/null)"
done

for _ in $(seq 120); do
  idle=$(sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | wc -l)
  [ "$idle" -eq "${#NODES[@]}" ] && break
  sleep 0.5
done
if [ "${idle:-0}" -ne "${#NODES[@]}" ]; then
  fail "nodes not idle after 60s: $(sinfo -h -N -o '%N %T %E' 2>&1 | tr '\n' ';') (logs in $d/log)"
fi
add_holder
log "up: ${#NODES[@]} nodes idle in $(elapsed "$t_start")s (total $(elapsed "$t0")s); SLURM_CONF=$SLURM_CONF"
echo "export SLURM_CONF=$SLURM_CONF"
