# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench-cloud bench-split proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on this kind of machine's disk; installing it first keeps
	# pip from resolving an unpinned torch to several GB of CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0 || echo "torch==2.13.0 not available here; pip will pick a torch"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pyflakes edge_runtime cloud_service split devices $(filter-out %_pb2.py,$(wildcard edgefold_proto/*.py)) scripts examples tests
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

bench-cloud: $(STAMP)
	$(BIN)/python scripts/bench_cloud.py

bench-split: $(STAMP)
	nice -n 10 $(BIN)/python scripts/bench_split.py

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
