# Set-up and entry points. Each target creates the virtualenv .venv on first use and installs
# exactly the pinned versions of constraints.txt, so a fresh machine needs only Python 3.11 + pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
WORKDIR ?= workdirs/demo

.PHONY: demo test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: setup.cfg constraints.txt | $(VENV)/bin/python
	$(PIP_INSTALL) -e '.[$*]'
	touch $@

## demo: set up and run the main job (the embedded example) into $(WORKDIR)
demo: $(VENV)/.installed-demo
	$(PY) launch.py --config configs/demo.py --workdir $(WORKDIR)

## test: set up and run the whole test suite
test: $(VENV)/.installed-test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) workdirs .pytest_cache
