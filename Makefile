# Two entry points for a fresh machine (see README.md):
#   make demo   set up .venv if needed, then run the main job on its embedded default
#   make test   set up .venv if needed, then run every test (slow end-to-end ones included)
# `make test PYTEST_ARGS="-m 'not slow'"` skips the slow tests locally; CI never does.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup lint espeak-ng

# The venv is created once; the install step runs every time, so a dependency added to
# pyproject.toml is installed on the next `make` (pip does nothing when all are present).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	@command -v espeak-ng >/dev/null 2>&1 || $(MAKE) --no-print-directory espeak-ng
	$(BIN)/pip install --quiet "setuptools>=77,<82"
	$(BIN)/pip install --quiet --no-build-isolation --editable '.[test]'

# Main job: DP-FedAvg on the embedded synthetic task (2,000 users, expected cohort 200, 40 rounds,
# per-layer clipping, noise calibrated for epsilon = 8, LAMB on the server), then its report.
demo: setup
	$(BIN)/dpfl simulate --run-dir runs/demo --overwrite
	$(BIN)/dpfl report runs/demo

# Offline speech synthesis for the synthetic speech corpus (a Debian package).
espeak-ng:
	$(SUDO) apt-get install -y -q espeak-ng || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q espeak-ng)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check dpfl tests
