# Set-up is part of every target: the virtual environment is created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-all lint format benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch and torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1).
	$(BIN)/python -m pip install --quiet -e '.[dev]'
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

clean:
	rm -rf runs outputs mlflow.db mlartifacts
