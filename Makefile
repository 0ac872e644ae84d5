# SegAssist developer entry points. Two targets matter on a fresh machine:
#   make demo   set up .venv and run an interactive session on the bundled model and sample
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
# e.g. https://download.pytorch.org/whl/cpu for the CPU-only build where the index is plain PyPI
TORCH_INDEX ?=
OUT ?= out/demo

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch alone and first, so nothing else drags in a different build
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# --overwrite: out/demo is the target's own folder, so a second `make demo` replaces the first run's files
demo: setup
	$(VENV)/bin/segassist demo --out $(OUT) --overwrite

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check SegAssistLib SegAssist Testing benchmarks scripts

bench: setup
	$(PY) benchmarks/engine_latency.py --threads 2

clean:
	rm -rf $(VENV) out .pytest_cache
