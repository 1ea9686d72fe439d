# Set up a virtual environment and run the tests or the demo from a fresh clone.
# TORCH pins the CPU build of PyTorch that this project is developed against; override it
# (e.g. `make test TORCH=torch`) to let pip choose a build for your platform.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
