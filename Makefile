# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/maspo-megatron demo

# A loopback Slurm cluster (scripts/slurm/up.sh: apt packages, munged, slurmctld, 3 slurmd) runs
# for the tests marked `slurm` and is stopped afterwards, also when tests fail or are interrupted.
# Where it cannot start, those tests skip and say why; under CI (CI set) they fail instead.
test: setup
	@trap 'bash scripts/slurm/down.sh --holder $$$$' EXIT; trap 'exit 130' INT TERM; \
	bash scripts/slurm/up.sh --holder $$$$ >/dev/null \
	  || echo "make test: no Slurm cluster (tests marked slurm will say why)" >&2; \
	SLURM_CONF=$${MASPO_SLURM_DIR:-/tmp/maspo-slurm}/etc/slurm.conf $(VENV)/python -m pytest $(PYTEST_ARGS)

test-gpu: setup
	bash scripts/gpu_tests.sh
