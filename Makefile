# One command each: `make demo` (set up + run the demo pipeline), `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test bench data clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	bash scripts/demo.sh

data: setup
	$(PY) data/make_example_data.py

clean:
	rm -rf demo_output bench_output .pytest_cache
