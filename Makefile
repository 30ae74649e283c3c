# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: setup demo test test-gpu
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/maspo-megatron demo

test: setup
	$(VENV)/python -m pytest $(PYTEST_ARGS)

test-gpu: setup
	bash scripts/gpu_tests.sh
