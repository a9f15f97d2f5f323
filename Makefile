# The two commands a fresh machine needs: `make demo` (the main job) and `make test`.
# Both first run scripts/setup.sh, which installs what is missing and is a no-op otherwise.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench gpu-check clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m mixpipe demo

test: setup
	$(PY) -m pytest -q

# Everything but the tests marked slow; for quick iteration.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m mixpipe bench server --quick
	$(PY) -m mixpipe bench speedup --quick

# The GPU paths (DALI device="mixed", GPU composition, CUDA training) on a generated 224 px tree,
# a few minutes; writes benchmarks/results/gpu_check.json. Without CUDA: one "no GPU" line, exit 0.
gpu-check: setup
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
