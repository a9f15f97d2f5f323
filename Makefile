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

# The first GPU run (scripts/gpu_check.py): the torch path on CUDA on a generated 224 px tree in
# about two minutes; DALI and FFCV parts are skipped when they do not import. No setup step: the
# GPU machine is bare (no network), so it runs on whatever python has torch there. Writes
# benchmarks/results/gpu-check/gpu_check.{json,log}. Without CUDA: one "no GPU" line, exit 0.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=. $(GPU_PY) scripts/gpu_check.py --out benchmarks/results/gpu-check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
