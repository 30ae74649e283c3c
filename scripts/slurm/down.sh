#!/usr/bin/env bash
# Stops the loopback cluster of up.sh: cancels its jobs, then stops the slurmd's, slurmctld and
# (if up.sh started it) munged, by the pids they wrote under $MASPO_SLURM_DIR.
#
#   down.sh                 stop it
#   down.sh --holder ID     drop holder ID; stop only when no other live holder uses the cluster
#                           (a plain `up.sh` holds it until a plain `down.sh`)
#   down.sh --force         stop it, whoever holds it
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
PATH=$PATH:/usr/sbin:/sbin

mode=${1:-}
holder=${2:-}
[ -d "$MASPO_SLURM_DIR" ] || exit 0
if [ -z "${MASPO_SLURM_LOCKED:-}" ]; then
  exec 9>"$MASPO_SLURM_DIR/lock"
  flock 9
fi

if [ "$mode" = "--holder" ]; then
  rm -f "$MASPO_SLURM_DIR/holders/$holder"
  for h in "$MASPO_SLURM_DIR"/holders/*; do
    [ -e "$h" ] || continue
    name=$(basename "$h")
    if [ "$name" = manual ] || pid_alive "$name"; then
      log "left running for holder $name"
      exit 0
    fi
    rm -f "$h"  # a holder that died without calling down.sh
  done
elif [ -z "$mode" ]; then
  rm -f "$MASPO_SLURM_DIR/holders/manual"
fi

d=$MASPO_SLURM_DIR
ctld=$(pid_of "$d/run/slurmctld.pid")
if pid_alive "$ctld" && [ -f "$SLURM_CONF" ]; then
  # Jobs first: slurmd leaves running steps behind when it stops.
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

pids=()
for f in "$d"/run/slurmd-*.pid "$d/run/slurmctld.pid"; do
  p=$(pid_of "$f")
  pid_alive "$p" && pids+=("$p")
done
if [ -f "$d/munged.pid.ours" ]; then
  p=$(pid_of "$d/munged.pid.ours")
  # munged's pid file is ours only while that process is still munged.
  if pid_alive "$p" && grep -q munged "/proc/$p/comm" 2>/dev/null; then pids+=("$p"); fi
  rm -f "$d/munged.pid.ours"
fi
if [ ${#pids[@]} -gt 0 ]; then
  kill -TERM "${pids[@]}" 2>/dev/null
  for _ in $(seq 50); do
    alive=0
    for p in "${pids[@]}"; do pid_alive "$p" && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in "${pids[@]}"; do pid_alive "$p" && kill -KILL "$p" 2>/dev/null; done
fi
rm -rf "$d/holders"
log "down"
exit 0
