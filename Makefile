# The two commands: `make repro` (whole pipeline, embedded profile) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test lab bench venv clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(STAMP)

# Papermill and the notebooks' kernel must come from the venv, also under DVC.
repro: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/dvc repro

test: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest

lab: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/jupyter lab notebooks/

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@

# Benchmarks read the stores the pipeline makes (dvc repro is a no-op when they are current).
bench: $(VENV)/.bench-installed repro
	@mkdir -p reports/bench
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; PATH=$(BIN):$$PATH $(BIN)/python $$b; done

clean-venv:
	rm -rf $(VENV)
