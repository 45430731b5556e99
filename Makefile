# Set-up is part of every target: the virtual environment is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package, the dev extra's and pip's own included, at one version with the hashes of its files
# (pip-compile --generate-hashes); resolved for CPython 3.11 on Linux x86_64. make lock updates it.
LOCK := requirements.lock

.PHONY: train test test-all lint format benchmark clean lock audit

# pip refuses any file whose hash is not in the lock, and anything the lock does not pin; the
# project itself goes in without dependencies and without a build environment (setuptools is
# pinned in the lock too). pip check fails when pyproject.toml asks for what the lock lacks.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check || { echo "pyproject.toml and $(LOCK) disagree: run make lock"; exit 1; }
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m trainer $(ARGS)

# The quick loop: every test not marked slow (pyproject.toml's addopts); under 15 minutes.
test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# Every test, the slow ones too (-m '' lifts the marker filter); under 45 minutes.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m '' --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy  # the files pyproject.toml's [tool.mypy] names

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

benchmark: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

# Re-resolve $(LOCK) from pyproject.toml (its dependencies, the dev and tflite extras) after a change
# there; pins already in the lock stay unless asked: make lock LOCK_ARGS=--upgrade (everything) or
# LOCK_ARGS="--upgrade-package mlflow". Needs the package index; commit the result.
lock:
	test -x $(BIN)/pip-compile || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install --quiet 'pip-tools>=7.4'; }
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes \
	  --allow-unsafe --extra dev --extra tflite --build-deps-for editable \
	  --no-emit-index-url --no-emit-find-links --output-file $(LOCK) $(LOCK_ARGS) pyproject.toml

# Known vulnerabilities of the versions $(LOCK) pins (pip-audit against OSV's database). Fails
# on one, unless its ID is in AUDIT_IGNORE (space-separated); when the database cannot be
# reached (no network) it says so in one line and does not fail.
AUDIT_IGNORE ?=
audit: $(STAMP)
	$(BIN)/python .ci/audit.py $(LOCK) $(AUDIT_IGNORE)

clean:
	rm -rf runs outputs mlflow.db mlartifacts
