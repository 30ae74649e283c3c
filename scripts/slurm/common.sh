# Sourced by up.sh / down.sh: where the loopback cluster lives and how it is named.
# Everything it writes (config, state, spools, logs, pid files, fake GPU device files) is under
# $MASPO_SLURM_DIR; nothing in /etc is written except what the Debian packages install.
MASPO_SLURM_DIR=${MASPO_SLURM_DIR:-/tmp/maspo-slurm}
SLURM_CONF=$MASPO_SLURM_DIR/etc/slurm.conf
export SLURM_CONF
NODES=(n0 n1 n2)
NODE_PORTS=(6821 6822 6823)
CTLD_PORT=${MASPO_SLURM_CTLD_PORT:-6817}
GPUS_PER_NODE=2
PARTITION=debug

log() { echo "slurm: $*" >&2; }

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -f "$1" ] && cat "$1" 2>/dev/null || true; }
