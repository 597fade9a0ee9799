# Two commands do all the set-up on a fresh machine: `make lab` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: lab test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/controlplane lab

# The tests run in parallel (pytest-xdist). They mostly wait on real Envoy processes, so
# more workers than cores pays: on 2 cores (shared with other load) the end-to-end and
# protocol tests took 180 s serially, 92-96 s with 2 workers and 88-124 s with 4 (three
# runs each; 6 workers: 121 s). The lab's tests share one worker (`loadgroup`: they
# prefer the same ports). Override with `make test TEST_WORKERS=2`.
TEST_WORKERS ?= 4

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Each bench writes a new bench/results/runs/<bench>-<UTC time>.json and prints where;
# the committed baselines in bench/results/ change only with --update-baseline.
bench: $(STAMP)
	$(BIN)/python bench/xds_push.py
	$(BIN)/python bench/xds_push.py --streams 1000 --services 1000 --scoped 10
	$(BIN)/python bench/reconnect_storm.py
	$(BIN)/python bench/envoy_memory.py
	$(BIN)/python bench/k8s_sync.py
	$(BIN)/python bench/mesh_file.py
	$(BIN)/python bench/pipeline_load.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/inject.py
	$(BIN)/python bench/convergence.py

clean:
	rm -rf $(VENV) build *.egg-info
