# One command sets everything up and runs: `make test`, `make quality` or `make demo`.
# Override TORCH_SPEC for another build, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
PYTHON ?= python3
# Test processes (pytest-xdist): one per core. Tests of a module stay in one process, so module fixtures build once.
TEST_WORKERS ?= auto
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= outputs/demo

.PHONY: install test quality demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip

# Torch goes in first, so the dependency resolver finds it satisfied and never fetches a CUDA build.
$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# Lint and format check, as configured in pyproject.toml (`ruff format .` and `ruff check --fix .` repair most).
quality: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: $(STAMP)
	$(PY) examples/arithmetic/demo.py --output_dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) outputs .pytest_cache
