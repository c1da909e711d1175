# Two entry points for a fresh machine (see README.md):
#   make demo   set up .venv if needed, then run the main job on its embedded default
#   make test   set up .venv if needed, then run every test (slow end-to-end ones included)
# `make test PYTEST_ARGS="-m 'not slow'"` skips the slow tests locally; CI never does.
# `make test PYTEST_WORKERS=0` runs the tests one at a time (e.g. with --durations).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup lint espeak-ng

# The venv is created once; the install step runs every time: scripts/needs_install.py checks
# every requirement of pyproject.toml and that dpfl is installed (editable) from this checkout,
# and pip runs when anything is missing, so a dependency added to pyproject.toml is installed on
# the next `make`.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	@command -v espeak-ng >/dev/null 2>&1 || $(MAKE) --no-print-directory espeak-ng
	@if $(BIN)/python scripts/needs_install.py; then \
		$(BIN)/pip install --quiet "setuptools>=77,<82" && \
		$(BIN)/pip install --quiet --no-build-isolation --editable '.[test]'; \
	else echo "setup: .venv is up to date"; fi

# Main job: DP-FedAvg on the embedded synthetic task (2,000 users, expected cohort 200, 40 rounds,
# per-layer clipping, noise calibrated for epsilon = 8, LAMB on the server), then its report.
demo: setup
	$(BIN)/dpfl simulate --run-dir runs/demo --overwrite
	$(BIN)/dpfl report runs/demo

# Offline speech synthesis for the synthetic speech corpus (a Debian package).
espeak-ng:
	$(SUDO) apt-get install -y -q espeak-ng || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q espeak-ng)

# Two pytest workers (pytest-xdist), one thread each (tests/conftest.py): on CI's 2 cores the
# suite takes about 13 min this way, against about 17 min one test at a time.
test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check dpfl tests
