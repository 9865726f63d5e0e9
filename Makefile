# The two entry points of the README: `make demo` (the main job) and `make test` (the whole suite).
# Both create the virtual environment in .venv/ when it is missing.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.plmetric-installed
# torch first and pinned: on the reference machine these wheels lie on local disk (CUDA build, runs on CPU).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,faiss]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plmetric demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
