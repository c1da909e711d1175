# Two entry points for a fresh machine (see README.md):
#   make demo   set up .venv if needed, then run the main job on its embedded default
#   make test   set up .venv if needed, then run every test (slow end-to-end ones included)
# `make test PYTEST_ARGS="-m 'not slow'"` skips the slow tests locally; CI never does.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test setup lint

# The venv is created once; the install step runs every time, so a dependency added to
# pyproject.toml is installed on the next `make` (pip does nothing when all are present).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install --quiet "setuptools>=77,<82"
	$(BIN)/pip install --quiet --no-build-isolation --editable '.[test]'

# Main job: the privacy budget of the DP-FL-for-ASR paper's training plan (sigma_DP = 1e-5,
# cohort 1,024 of Common Voice's 34,753 speakers, 2,006 rounds, delta = 1e-9) under the three
# accountants, and its extrapolation to larger populations (x200 gives the paper's epsilon 4.5).
demo: setup
	$(BIN)/dpfl budget --sigma-dp 1e-5 --cohort 1024 --population 34753 --rounds 2006 \
		--delta 1e-9 --extrapolate 10 100 200 204800:69506000

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check dpfl tests
