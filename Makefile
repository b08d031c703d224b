# `make demo` and `make test` work on a fresh machine: they create .venv and install exactly what
# requirements/dev.txt pins (compiled from pyproject.toml by pip-tools; `make lock` regenerates it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/dev.txt
PYTEST := $(PY) -m pytest -q
# The suite runs on TEST_WORKERS pytest-xdist workers: most tests wait on one single-threaded daemon or torch
# call at a time, and a serial run left one of two cores idle (47% idle over the whole run). Tests that share
# the one local Ray instance run on one worker, in order (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadgroup
EXTRAS := --extra cloud --extra dev --extra http --extra bottleneck --extra pretrained --extra onnx --extra plot --extra bench --extra transformers --extra ray

.PHONY: demo test test-edge test-fast test-integration lint docs protos bench lock clean browser

# The torch-free edge's environment: what `pip install cleave` (no extra) installs, plus pytest, from
# requirements/edge.txt (compiled from pyproject.toml's base dependencies, pinned to dev.txt's versions).
EDGE_VENV := .venv-edge
EDGE_PY := $(EDGE_VENV)/bin/python
EDGE_STAMP := $(EDGE_VENV)/.installed
EDGE_LOCK := requirements/edge.txt

$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep "^pip==" $(LOCK))"
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

$(EDGE_STAMP): $(EDGE_LOCK) $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_PY) -m pip install --quiet "$$(grep "^pip==" $(LOCK))"
	$(EDGE_PY) -m pip install --quiet -r $(EDGE_LOCK)
	$(EDGE_PY) -m pip install --quiet --no-deps -e .
	$(EDGE_PY) -m pip check   # the lock holds every base dependency of the package
	touch $(EDGE_STAMP)

demo: $(STAMP)
	$(PY) -m cleave_cli.demo

# Debian's headless Chromium and its driver, for the web console's browser test (tests/test_console.py).
# Needs root; elsewhere it says why and the test skips with the same hint.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "browser: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; } || \
			echo "browser: WARNING: apt-get could not install chromium: tests/test_console.py will skip, saying so"; \
	else \
		echo "browser: not root, so chromium is not installed: tests/test_console.py will skip (run 'sudo make browser')"; \
	fi

# Everything: unit, integration (real daemons), root (namespaces, tc, cgroups) and slow tests; then the
# torch-free edge's own tests in its own environment (test-edge).
test: $(STAMP) browser
	$(PYTEST) $(PARALLEL) --durations=25 --ignore=tests/edge
	$(MAKE) test-edge

# The edge's own tests (tests/edge) in .venv-edge, which has no torch: the edge daemon serves an edge
# bundle there against a cloud daemon (and a bundle) from .venv. tests/conftest.py imports torch, so
# conftest files are read from tests/edge down only. Serial: each xdist worker would build its own session
# bundles, and two workers took as long as one (157 s and 152 s).
test-edge: $(STAMP) $(EDGE_STAMP)
	@if $(EDGE_PY) -c "import torch" 2>/dev/null; then echo "test-edge: torch imports in $(EDGE_VENV); it must not"; exit 1; fi
	@echo "test-edge: $(EDGE_VENV) has no torch ($$(du -sm $(EDGE_VENV) | cut -f1) MB installed)"
	CLEAVE_CLOUD_PYTHON=$(abspath $(PY)) $(EDGE_PY) -m pytest -q -p no:cacheprovider --confcutdir=tests/edge -m edge tests/edge

# Unit tests only: no daemons, no root, no training.
test-fast: $(STAMP)
	$(PYTEST) $(PARALLEL) -m unit

test-integration: $(STAMP) browser
	$(PYTEST) $(PARALLEL) -m "not unit"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrite the benchmark tables in README.md and docs/*.md from benchmarks/results/*.json (the unit tests
# fail while a committed table differs from its JSON). Standard library only: no venv needed.
docs:
	$(PYTHON) -m benchmarks.tables

protos: $(STAMP)
	$(PY) -m protos.generate

bench: $(STAMP)
	$(PY) -m benchmarks.overhead

# Re-resolve every dependency to the newest releases pyproject.toml and requirements/pins.in allow.
# Commit the new requirements/dev.txt only after `make test` passes with it.
lock: $(STAMP)
	rm -f $(LOCK).new
	$(VENV)/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		$(EXTRAS) -o $(LOCK).new pyproject.toml requirements/pins.in
	sed -i '/^cleave @ file:/,+1d' $(LOCK).new   # dev pulls cleave[cloud]: the package itself is installed with -e
	mv $(LOCK).new $(LOCK)
	$(VENV)/bin/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--extra edge-test -c $(LOCK) -o $(EDGE_LOCK) pyproject.toml

clean:
	rm -rf $(VENV) $(EDGE_VENV) build *.egg-info
