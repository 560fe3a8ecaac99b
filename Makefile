# The two set-up commands of the README: `make demo` and `make test`. Each creates the venv
# and installs what it needs. torch comes first and pinned: that CPU wheel is on disk, while a
# bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-encoder demo-seq2seq test test-fast bench lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo $(DEMO_ARGS)

demo-encoder: $(STAMP)
	$(PY) -m launch.demo --recipe encoder $(DEMO_ARGS)

demo-seq2seq: $(STAMP)
	$(PY) -m launch.demo --recipe seq2seq $(DEMO_ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

bench: $(STAMP)
	PYTHONPATH=. $(PY) bench/data_throughput.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
