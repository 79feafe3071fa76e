# One command each: `make demo` (set up + run the demo pipeline), `make test` (set up + run the tests).
# `make setup GPU=1` installs TensorFlow's CUDA build (requirements-gpu.txt) instead of the CPU one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?= 0
REQUIREMENTS := $(if $(filter 1,$(GPU)),requirements-gpu.txt,requirements.txt)
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test test-all test-fast lint bench data clean

setup: $(VENV)/.installed-$(GPU)

$(VENV)/.installed-$(GPU): requirements.txt requirements-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	rm -f $(VENV)/.installed-*
	touch $@

test: setup  # what CI runs: everything but the tests marked slow (a few minutes on 2 cores)
	$(PY) -m pytest -q -m "not slow" tests

test-all: setup  # the whole suite, slow tests included (about 15-20 minutes on 2 cores)
	$(PY) -m pytest -q tests

test-fast: test

lint: setup
	$(PY) -m ruff check .

demo: setup
	bash scripts/demo.sh
	@pkg="$${DEMO_OUTPUT:-demo_output}/model/bioimageio_model"; \
	if [ -f "$$pkg/rdf.yaml" ]; then echo "  bioimage.io    $$pkg.zip  (Fiji/deepImageJ, ilastik, napari: README, 'Use the model in Fiji, ilastik, napari')"; \
	else echo "  bioimage.io    not written (see the training log); build it: $(PY) scripts/export_bioimageio.py --saved_model_filepath $${DEMO_OUTPUT:-demo_output}/model/saved_model --output_folder $${DEMO_OUTPUT:-demo_output}/model"; fi

data: setup
	$(PY) data/make_example_data.py

clean:
	rm -rf demo_output bench_output .pytest_cache
