# The two commands: `make repro` (whole pipeline, embedded profile) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test lab bench venv clean-venv browser

NO_DEPS := $(shell $(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['tool']['datalens']['install-without-deps']))")

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[ekfac]'
	# kronfluence without its declared torchvision, whose installer would replace the pinned torch
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(NO_DEPS)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(STAMP)

# Papermill and the notebooks' kernel must come from the venv, also under DVC.
# A bad value anywhere in params.yaml stops here, in one line, before any stage starts.
repro: $(STAMP)
	@$(BIN)/python -m datalens.core.config params.yaml
	PATH=$(BIN):$$PATH $(BIN)/dvc repro

# The report is tested in a real browser: Debian's chromium, headless, installed here when missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "could not install chromium (Debian's apt-get as root): the report's browser test will fail"

# The tests compare our TRAK with the public traker too, so they install the bench extra.
test: $(VENV)/.bench-installed browser
	PATH=$(BIN):$$PATH $(BIN)/python -m pytest

# LAB_ARGS passes options through, e.g. LAB_ARGS="--no-browser --port=8899"
# As root (a container), JupyterLab refuses to start without --allow-root: pass it only then.
ROOT_FLAG := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

lab: $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/jupyter lab notebooks/ $(ROOT_FLAG) $(LAB_ARGS)

$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	touch $@

# Benchmarks read the stores the pipeline makes (dvc repro is a no-op when they are current).
bench: $(VENV)/.bench-installed repro
	@mkdir -p reports/bench
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; PATH=$(BIN):$$PATH $(BIN)/python $$b; done

clean-venv:
	rm -rf $(VENV)
