# k2quant: the two commands of the README.
#   make demo   installs what it needs, then runs the embedded default (egs/mini/ASR/run.sh)
#   make test   installs what it needs, then runs the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-core demo test test-core test-fast clean

install:
	@bash tools/install.sh --venv $(VENV)

install-core:
	@bash tools/install_core_torch2.sh

demo: install
	@bash egs/mini/ASR/run.sh

test: install
	$(PY) -m pytest -q -ra tests

# The core subset on a current torch 2.x with k2 absent (tests needing k2 skip with a reason).
test-core: install-core
	.venv-core/bin/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) .venv-core build *.egg-info
