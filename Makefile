# make test : create .venv, install defi-jax with its test dependencies, run the whole test suite.
# make demo : run the main job (every stage on the embedded Meta-World demo data) into workdirs/demo.
#             DEMO_ARGS passes flags through, e.g. make demo DEMO_ARGS="--steps=5 --workdir=/tmp/d".
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_ARGS ?=

.PHONY: test demo install

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: this version is the CPU build; an unpinned torch would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,sim]'
	touch $@

test: install
	$(PY) -m pytest -q -n 2 --durations=15 tests

demo: install
	$(PY) -m launch.demo --workdir=workdirs/demo $(DEMO_ARGS)
