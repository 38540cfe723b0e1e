# The two commands: `make repro` (whole pipeline, embedded profile) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test lab bench venv clean-venv browser gpu-wheels

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
	@set -e; for b in benchmarks/*.py; do [ $$b = benchmarks/gpu_smoke.py ] && continue; \
	  echo "== $$b"; PATH=$(BIN):$$PATH $(BIN)/python $$b; done   # gpu_smoke needs a GPU: benchmarks/gpu_smoke.sh

# Wheels of what a GPU machine's own torch image lacks (zarr, pydantic and theirs, at this venv's
# versions; not numpy or torch, which it has), for Python 3.12 on x86-64 Linux, into .gpu-wheels/ to
# carry there (benchmarks/gpu_smoke.sh installs them with WHEELS=.gpu-wheels).
GPU_PY ?= 3.12
GPU_WHEELS := zarr numcodecs donfig google-crc32c pydantic pydantic_core annotated-types typing-inspection
gpu-wheels: $(STAMP)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  -d .gpu-wheels $$($(BIN)/pip freeze --all | grep -iE '^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==')
